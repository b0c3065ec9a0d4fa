//! SQL identifiers for ClickHouse. Names from configuration reach SQL only
//! after this check, and always quoted.

/// Accepts `[A-Za-z_][A-Za-z0-9_]*` up to 64 characters.
pub fn check_identifier(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let valid_start = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if valid_start && name.len() <= 64 && chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid identifier: use letters, digits and '_', starting with a letter or '_', at most 64 characters"
        ))
    }
}

/// The identifier in backquotes, after checking it.
pub fn quote_identifier(name: &str) -> Result<String, String> {
    check_identifier(name).map(|()| format!("`{name}`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_identifiers_are_refused() {
        assert_eq!(
            quote_identifier("shopstream_test").unwrap(),
            "`shopstream_test`"
        );
        for bad in [
            "",
            "1db",
            "db; DROP TABLE x",
            "a`b",
            "db.table",
            "ünï",
            &"x".repeat(65),
        ] {
            assert!(check_identifier(bad).is_err(), "{bad}");
        }
    }
}
