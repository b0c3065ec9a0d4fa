//! What each consumed topic is for, from the catalog: an event topic, or a
//! retry tier of one; and where a record goes when it fails again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use backbone::catalog::Catalog;
use backbone::events::EventType;

/// A topic the worker reads.
#[derive(Debug, Clone)]
pub struct Route {
    /// The event topic (itself, or the one a tier belongs to).
    pub source: Arc<str>,
    pub event: EventType,
    /// `None` for the event topic; `Some(i)` for retry tier `i`.
    pub tier: Option<usize>,
    /// For a tier: how long a record waits before the handler runs again.
    pub delay: Duration,
    /// Retry tier topics of the source, in order.
    pub tiers: Arc<[Arc<str>]>,
    /// The source's dead-letter topic, if it has one.
    pub dead_letter: Option<Arc<str>>,
}

impl Route {
    /// Where a record that failed here goes next: the next tier, else the DLQ.
    pub fn next_hop(&self) -> Hop {
        let next = self.tier.map_or(0, |t| t + 1);
        match self.tiers.get(next) {
            Some(topic) => Hop::Tier(next, topic.clone()),
            None => match &self.dead_letter {
                Some(topic) => Hop::DeadLetter(topic.clone()),
                None => Hop::Nowhere,
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hop {
    Tier(usize, Arc<str>),
    DeadLetter(Arc<str>),
    /// No tier left and no DLQ: the record blocks its partition until it
    /// succeeds, because dropping it would lose data.
    Nowhere,
}

/// Routes by topic name.
#[derive(Debug, Clone)]
pub struct Routes(HashMap<Arc<str>, Route>);

impl Routes {
    /// The catalog's event topics (all, or those named in `only`) and their
    /// tiers; a name that is not an event topic of the catalog is an error
    /// that lists the ones it has.
    pub fn new(catalog: &Catalog, only: &[String]) -> Result<Self, String> {
        if let Some(unknown) = only
            .iter()
            .find(|name| !catalog.topics.iter().any(|t| &t.name == *name))
        {
            let known: Vec<&str> = catalog.topics.iter().map(|t| t.name.as_str()).collect();
            return Err(format!(
                "`{unknown}` is not an event topic of the catalog; its event topics: {} (retry tiers come with their topic)",
                known.join(", ")
            ));
        }
        let mut routes = HashMap::new();
        for topic in &catalog.topics {
            if !only.is_empty() && !only.contains(&topic.name) {
                continue;
            }
            let source: Arc<str> = topic.name.as_str().into();
            let tiers: Arc<[Arc<str>]> = topic
                .retry_tiers
                .iter()
                .map(|t| t.topic.as_str().into())
                .collect();
            let dead_letter: Option<Arc<str>> =
                topic.dead_letter.as_ref().map(|d| d.topic.as_str().into());
            let base = Route {
                source: source.clone(),
                event: topic.event,
                tier: None,
                delay: Duration::ZERO,
                tiers: tiers.clone(),
                dead_letter,
            };
            for (i, tier) in topic.retry_tiers.iter().enumerate() {
                let route = Route {
                    tier: Some(i),
                    delay: tier.delay,
                    ..base.clone()
                };
                routes.insert(tiers[i].clone(), route);
            }
            routes.insert(source, base);
        }
        Ok(Self(routes))
    }

    pub fn get(&self, topic: &str) -> Option<&Route> {
        self.0.get(topic)
    }

    /// The route and the shared name of `topic`, so callers need not allocate one.
    pub fn get_key_value(&self, topic: &str) -> Option<(&Arc<str>, &Route)> {
        self.0.get_key_value(topic)
    }

    /// Every topic to subscribe to.
    pub fn topics(&self) -> Vec<&str> {
        let mut topics: Vec<&str> = self.0.keys().map(|t| &**t).collect();
        topics.sort_unstable();
        topics
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn failures_walk_the_tiers_then_reach_the_dead_letter_queue() {
        let catalog = Catalog::load(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../topics.yaml"),
            None,
        )
        .unwrap();
        let routes = Routes::new(&catalog, &[]).unwrap();
        let orders = routes.get("orders").unwrap();
        assert_eq!(orders.next_hop(), Hop::Tier(0, "orders.retry.5s".into()));
        let tier = routes.get("orders.retry.1m").unwrap();
        assert_eq!(
            (&*tier.source, tier.delay),
            ("orders", Duration::from_secs(60))
        );
        assert_eq!(tier.next_hop(), Hop::Tier(2, "orders.retry.10m".into()));
        assert_eq!(
            routes.get("orders.retry.10m").unwrap().next_hop(),
            Hop::DeadLetter("orders.dlq".into())
        );
        assert_eq!(routes.topics().len(), 4 + 8);
        let only_chat = Routes::new(&catalog, &["chat-messages".into()]).unwrap();
        assert_eq!(
            only_chat.topics(),
            ["chat-messages", "chat-messages.retry.5s"]
        );
        let error = Routes::new(&catalog, &["orders.retry.5s".into()]).unwrap_err();
        assert!(
            error.contains("`orders.retry.5s` is not an event topic")
                && error.contains("user-events, orders, chat-messages, search-queries"),
            "{error}"
        );
    }
}
