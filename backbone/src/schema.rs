//! Every version of every event schema, embedded from `schemas/` at build time,
//! indexed by the CRC-64-AVRO (Rabin) fingerprint that single-object encoding
//! puts in front of each record.

use std::sync::LazyLock;

use apache_avro::Schema;

use crate::events::EventType;

/// Largest allocation the Avro decoder may make for one record. Kafka's
/// default message limit is 1 MiB, so 8 MiB leaves room while stopping a
/// corrupt length prefix from allocating gigabytes.
pub const MAX_DECODE_ALLOCATION: usize = 8 * 1024 * 1024;

/// The schema files, oldest version first. A test checks this list against
/// the `schemas/` folder, so a new file cannot be forgotten here.
const SOURCES: &[(EventType, u32, &str)] = &[
    (
        EventType::User,
        1,
        include_str!("../../schemas/user_event/v1.avsc"),
    ),
    (
        EventType::Order,
        1,
        include_str!("../../schemas/order_event/v1.avsc"),
    ),
    (
        EventType::Chat,
        1,
        include_str!("../../schemas/chat_message/v1.avsc"),
    ),
    (
        EventType::Chat,
        2,
        include_str!("../../schemas/chat_message/v2.avsc"),
    ),
    (
        EventType::Search,
        1,
        include_str!("../../schemas/search_query/v1.avsc"),
    ),
];

/// One version of one event's schema.
#[derive(Debug)]
pub struct SchemaVersion {
    pub event: EventType,
    pub version: u32,
    pub schema: Schema,
    /// Rabin fingerprint of the parsing canonical form, as the 8 little-endian
    /// bytes single-object encoding writes.
    pub fingerprint: [u8; 8],
    /// The fingerprint in hex, as the `schema-fingerprint` header carries it.
    fingerprint_hex: String,
    /// The `.avsc` text as shipped.
    pub source: &'static str,
}

impl SchemaVersion {
    /// The single-object encoding header: `C3 01` then the fingerprint.
    pub fn single_object_header(&self) -> [u8; 10] {
        let mut header = [0u8; 10];
        header[0] = 0xC3;
        header[1] = 0x01;
        header[2..].copy_from_slice(&self.fingerprint);
        header
    }

    /// The fingerprint as the `schema-fingerprint` header shows it.
    pub fn fingerprint_hex(&self) -> &str {
        &self.fingerprint_hex
    }
}

/// All known schema versions.
#[derive(Debug)]
pub struct SchemaRegistry {
    versions: Vec<SchemaVersion>,
    /// Index of each event type's newest version, by `EventType::index`.
    current: [usize; 4],
}

static REGISTRY: LazyLock<SchemaRegistry> = LazyLock::new(|| {
    apache_avro::util::max_allocation_bytes(MAX_DECODE_ALLOCATION);
    SchemaRegistry::from_sources(SOURCES).expect("embedded schemas are valid (tested)")
});

impl SchemaRegistry {
    /// The registry of the schemas compiled into this binary.
    pub fn global() -> &'static SchemaRegistry {
        &REGISTRY
    }

    fn from_sources(
        sources: &[(EventType, u32, &'static str)],
    ) -> Result<Self, apache_avro::Error> {
        let mut versions = Vec::with_capacity(sources.len());
        for &(event, version, source) in sources {
            let schema = Schema::parse_str(source)?;
            let fingerprint = fingerprint(&schema);
            versions.push(SchemaVersion {
                event,
                version,
                schema,
                fingerprint,
                fingerprint_hex: hex(&fingerprint),
                source,
            });
        }
        let current = EventType::ALL.map(|event| {
            (0..versions.len())
                .filter(|&i| versions[i].event == event)
                .max_by_key(|&i| versions[i].version)
                .expect("every event type has a schema (tested)")
        });
        Ok(Self { versions, current })
    }

    /// The version producers write today: the newest one.
    pub fn current(&self, event: EventType) -> &SchemaVersion {
        &self.versions[self.current[event.index()]]
    }

    /// Looked up for every Avro record: a scan of a handful of 8-byte keys
    /// beats hashing one (SipHash was 4% of decoding an event).
    pub fn by_fingerprint(&self, fingerprint: &[u8; 8]) -> Option<&SchemaVersion> {
        self.versions.iter().find(|v| &v.fingerprint == fingerprint)
    }

    pub fn version(&self, event: EventType, version: u32) -> Option<&SchemaVersion> {
        self.versions
            .iter()
            .find(|v| v.event == event && v.version == version)
    }

    pub fn versions(&self) -> &[SchemaVersion] {
        &self.versions
    }
}

/// The Avro Parsing Canonical Form. apache-avro's own leaves a primitive with
/// a logical type as `{"type":"string"}`, but the specification's rule
/// [PRIMITIVES] reduces it to `"string"`, as Java and fastavro do; without
/// this our fingerprints would not match theirs.
pub fn parsing_canonical_form(schema: &Schema) -> String {
    const PRIMITIVES: [&str; 8] = [
        "null", "boolean", "int", "long", "float", "double", "bytes", "string",
    ];
    let mut form = schema.canonical_form();
    for primitive in PRIMITIVES {
        form = form.replace(
            &format!(r#"{{"type":"{primitive}"}}"#),
            &format!(r#""{primitive}""#),
        );
    }
    form
}

/// CRC-64-AVRO of the parsing canonical form, little-endian as single-object
/// encoding writes it.
pub fn fingerprint(schema: &Schema) -> [u8; 8] {
    crc64_avro(parsing_canonical_form(schema).as_bytes()).to_le_bytes()
}

/// The Rabin fingerprint the Avro specification defines.
fn crc64_avro(bytes: &[u8]) -> u64 {
    const EMPTY: u64 = 0xc15d_213a_a4d7_a795;
    const TABLE: [u64; 256] = {
        let mut table = [0u64; 256];
        let mut i = 0;
        while i < 256 {
            let mut fp = i as u64;
            let mut bit = 0;
            while bit < 8 {
                fp = (fp >> 1) ^ (EMPTY & 0u64.wrapping_sub(fp & 1));
                bit += 1;
            }
            table[i] = fp;
            i += 1;
        }
        table
    };
    bytes.iter().fold(EMPTY, |fp, &b| {
        (fp >> 8) ^ TABLE[((fp ^ b as u64) & 0xff) as usize]
    })
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn every_schema_file_is_embedded_and_every_event_has_one() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas");
        let mut on_disk = Vec::new();
        for dir in std::fs::read_dir(&root).unwrap() {
            let dir = dir.unwrap().path();
            for file in std::fs::read_dir(&dir).unwrap() {
                let file = file.unwrap().path();
                let event = dir.file_name().unwrap().to_str().unwrap().to_owned();
                let stem = file.file_stem().unwrap().to_str().unwrap().to_owned();
                assert_eq!(file.extension().unwrap(), "avsc", "{file:?}");
                on_disk.push((event, stem));
            }
        }
        on_disk.sort();
        let mut embedded: Vec<_> = SOURCES
            .iter()
            .map(|(e, v, _)| (e.name().to_owned(), format!("v{v}")))
            .collect();
        embedded.sort();
        assert_eq!(on_disk, embedded);
        for event in EventType::ALL {
            let current = SchemaRegistry::global().current(event);
            assert_eq!(
                current.schema.name().unwrap().fullname(None),
                event.avro_full_name()
            );
        }
    }

    #[test]
    fn event_type_indexes_follow_all() {
        for (i, event) in EventType::ALL.into_iter().enumerate() {
            assert_eq!(event.index(), i);
            assert_eq!(EventType::from_name(event.name()), Some(event));
        }
    }

    #[test]
    fn embedded_sources_match_the_files() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas");
        for v in SchemaRegistry::global().versions() {
            let path = root
                .join(v.event.name())
                .join(format!("v{}.avsc", v.version));
            assert_eq!(
                std::fs::read_to_string(&path).unwrap(),
                v.source,
                "{path:?}"
            );
        }
    }

    #[test]
    fn fingerprints_are_distinct_and_follow_the_specification() {
        let registry = SchemaRegistry::global();
        let distinct: std::collections::HashSet<_> =
            registry.versions.iter().map(|v| v.fingerprint).collect();
        assert_eq!(distinct.len(), registry.versions.len());
        // The Avro specification's test vector: "null" -> 0x63dd24e7cc258f8a.
        let null = Schema::parse_str(r#""null""#).unwrap();
        assert_eq!(u64::from_le_bytes(fingerprint(&null)), 0x63dd24e7cc258f8a);
        // Logical types vanish from the canonical form (rule [PRIMITIVES]).
        let chat = registry.current(EventType::Chat);
        let form = parsing_canonical_form(&chat.schema);
        assert!(
            form.contains(r#"{"name":"event_id","type":"string"}"#),
            "{form}"
        );
        assert_eq!(&chat.single_object_header()[..2], &[0xC3, 0x01]);
    }
}
