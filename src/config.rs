//! Kafka client settings: the bootstrap servers plus any librdkafka property,
//! from `KSER_KAFKA_*` environment variables and `-X key=value` flags.
//!
//! Secrets (SASL passwords, key passwords, OAuth secrets) are passed to
//! librdkafka but never printed: [`KafkaConfig`]'s `Debug` masks them.

use std::collections::BTreeMap;
use std::fmt;

use rdkafka::ClientConfig;

/// Prefix of environment variables that become librdkafka properties:
/// `KSER_KAFKA_SASL_MECHANISM=PLAIN` sets `sasl.mechanism=PLAIN`.
pub const ENV_PREFIX: &str = "KSER_KAFKA_";

/// Errors in the Kafka settings.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A `-X` argument without `=`; shown only when it names no secret.
    #[error("invalid Kafka property '{0}': expected key=value")]
    InvalidProperty(String),
    /// librdkafka refused a property (an unknown name, a value out of
    /// range); the reason has every secret value masked.
    #[error("Kafka property '{key}' refused: {reason}")]
    Refused {
        /// The property.
        key: String,
        /// Why, secrets masked.
        reason: String,
    },
}

/// Which kind of client a configuration is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientRole {
    /// A worker's consumer, or a reader of a topic.
    Consumer,
    /// A producer (`send`, the worker's next steps and dead letters).
    Producer,
    /// An admin client (topic creation, broker checks).
    Admin,
}

/// librdkafka properties only a consumer understands.
const CONSUMER_ONLY: &[&str] = &[
    "group.id",
    "group.instance.id",
    "group.protocol",
    "group.remote.assignor",
    "partition.assignment.strategy",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "max.poll.interval.ms",
    "auto.offset.reset",
    "enable.auto.commit",
    "auto.commit.interval.ms",
    "enable.auto.offset.store",
    "enable.partition.eof",
    "fetch.min.bytes",
    "fetch.max.bytes",
    "fetch.wait.max.ms",
    "max.partition.fetch.bytes",
    "queued.min.messages",
    "queued.max.messages.kbytes",
    "isolation.level",
    "check.crcs",
];

/// librdkafka properties only a producer understands.
const PRODUCER_ONLY: &[&str] = &[
    "acks",
    "request.required.acks",
    "linger.ms",
    "queue.buffering.max.ms",
    "queue.buffering.max.messages",
    "queue.buffering.max.kbytes",
    "batch.size",
    "batch.num.messages",
    "compression.type",
    "compression.codec",
    "enable.idempotence",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "message.send.max.retries",
    "retries",
    "retry.backoff.ms",
    "partitioner",
    "transactional.id",
];

/// How to reach Kafka.
#[derive(Clone, Default)]
pub struct KafkaConfig {
    /// `bootstrap.servers`, e.g. `127.0.0.1:9092`.
    pub brokers: String,
    properties: BTreeMap<String, String>,
}

impl KafkaConfig {
    /// Settings for `brokers` with no extra property.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            properties: BTreeMap::new(),
        }
    }

    /// Adds the `KSER_KAFKA_*` variables of the process environment.
    pub fn with_env(mut self) -> Self {
        for (name, value) in std::env::vars() {
            if let Some(key) = name.strip_prefix(ENV_PREFIX) {
                self.properties
                    .insert(key.to_ascii_lowercase().replace('_', "."), value);
            }
        }
        self
    }

    /// Adds `key=value` properties; these win over the environment.
    pub fn with_properties<S: AsRef<str>>(mut self, pairs: &[S]) -> Result<Self, ConfigError> {
        for pair in pairs {
            let pair = pair.as_ref();
            let (key, value) = pair
                .split_once('=')
                .filter(|(key, _)| !key.trim().is_empty())
                .ok_or_else(|| ConfigError::InvalidProperty(mask_pair(pair)))?;
            self.properties
                .insert(key.trim().to_owned(), value.to_owned());
        }
        Ok(self)
    }

    /// Checks every property with librdkafka itself, so a name it does not
    /// know or a value it refuses is an error before any client is built.
    /// librdkafka's own message quotes the value; here secret values (see
    /// `is_secret`) are masked in it.
    pub fn check(&self) -> Result<(), ConfigError> {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        match config.create_native_config() {
            Ok(_) => Ok(()),
            Err(rdkafka::error::KafkaError::ClientConfig(_, reason, key, _)) => {
                Err(ConfigError::Refused {
                    reason: self.mask(&reason),
                    key,
                })
            }
            Err(err) => Err(ConfigError::Refused {
                key: String::new(),
                reason: self.mask(&err.to_string()),
            }),
        }
    }

    /// `text` with the value of every secret property replaced by `***`:
    /// for messages from librdkafka, which may quote a value.
    pub fn mask(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for (key, value) in &self.properties {
            if is_secret(key) && !value.is_empty() {
                text = text.replace(value.as_str(), "***");
            }
        }
        text
    }

    /// Sets one property.
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.properties.insert(key.into(), value.into());
        self
    }

    /// The librdkafka configuration with kser's defaults, the user's
    /// properties on top of them. Properties that belong to the other kind of
    /// client (`session.timeout.ms` for a producer, `linger.ms` for a
    /// consumer) are left out, so one set of settings serves both without
    /// librdkafka warnings.
    pub fn client_config(&self, role: ClientRole, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (key, value) in defaults {
            config.set(*key, *value);
        }
        for (key, value) in &self.properties {
            let foreign = match role {
                ClientRole::Consumer => PRODUCER_ONLY.contains(&key.as_str()),
                ClientRole::Producer => CONSUMER_ONLY.contains(&key.as_str()),
                ClientRole::Admin => {
                    PRODUCER_ONLY.contains(&key.as_str()) || CONSUMER_ONLY.contains(&key.as_str())
                }
            };
            if !foreign {
                config.set(key, value);
            }
        }
        config
    }
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        map.entry(&"bootstrap.servers", &self.brokers);
        for (key, value) in &self.properties {
            if is_secret(key) {
                map.entry(key, &"***");
            } else {
                map.entry(key, value);
            }
        }
        map.finish()
    }
}

/// Whether a librdkafka property holds a secret: passwords, keys and their
/// stores, OAuth secrets and configurations, SASL JAAS settings, tokens.
/// Their values are masked wherever kser prints a setting or a message
/// that may quote one.
pub(crate) fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "jaas",
        "token",
        "ssl.key.",
        "ssl.keystore",
        "ssl_key",
        "sasl.oauthbearer.config",
        "private",
        "credential",
    ]
    .iter()
    .any(|word| key.contains(word))
}

/// A malformed `-X` argument as it may be shown: not at all when it names a
/// secret, since where its value starts is unknown.
fn mask_pair(pair: &str) -> String {
    if is_secret(pair) {
        "<a property naming a secret, not shown>".to_owned()
    } else {
        pair.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_masks_secrets() {
        let config = KafkaConfig::new("b:9092")
            .with_properties(&[
                "sasl.username=kser",
                "sasl.password=hunter2",
                "ssl.key.password=x",
            ])
            .expect("valid");
        let text = format!("{config:?}");
        assert!(text.contains("kser"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("***"), "{text}");
    }

    #[test]
    fn properties_reach_librdkafka_over_defaults() {
        let config = KafkaConfig::new("b:9092")
            .with_properties(&["linger.ms=50"])
            .expect("valid");
        let client =
            config.client_config(ClientRole::Producer, &[("linger.ms", "5"), ("acks", "all")]);
        assert_eq!(client.get("linger.ms"), Some("50"));
        assert_eq!(client.get("acks"), Some("all"));
        assert_eq!(client.get("bootstrap.servers"), Some("b:9092"));
    }

    #[test]
    fn each_client_takes_only_its_own_properties() {
        let config = KafkaConfig::new("b")
            .with_properties(&["session.timeout.ms=6000", "linger.ms=50", "sasl.username=u"])
            .expect("valid");
        let consumer = config.client_config(ClientRole::Consumer, &[]);
        assert_eq!(consumer.get("session.timeout.ms"), Some("6000"));
        assert_eq!(consumer.get("linger.ms"), None);
        let producer = config.client_config(ClientRole::Producer, &[]);
        assert_eq!(producer.get("session.timeout.ms"), None);
        assert_eq!(producer.get("linger.ms"), Some("50"));
        assert_eq!(producer.get("sasl.username"), Some("u"));
        let admin = config.client_config(ClientRole::Admin, &[]);
        assert_eq!(admin.get("sasl.username"), Some("u"));
        assert_eq!(admin.get("linger.ms"), None);
    }

    #[test]
    fn malformed_property_is_an_error_without_the_secret() {
        let err = KafkaConfig::new("b")
            .with_properties(&["nonsense"])
            .expect_err("error");
        assert!(err.to_string().contains("nonsense"));
        let err = KafkaConfig::new("b")
            .with_properties(&["=x"])
            .expect_err("error");
        assert!(err.to_string().contains("key=value"));
        let err = KafkaConfig::new("b")
            .with_properties(&["sasl.password:hunter2"])
            .expect_err("error");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn secret_names_are_recognised() {
        for key in [
            "sasl.password",
            "ssl.key.password",
            "ssl.key.pem",
            "ssl.keystore.password",
            "sasl.oauthbearer.config",
            "sasl.oauthbearer.client.secret",
            "sasl.oauthbearer.assertion.private.key.passphrase",
            "SASL.PASSWORD",
        ] {
            assert!(is_secret(key), "{key}");
        }
        for key in ["sasl.username", "bootstrap.servers", "linger.ms"] {
            assert!(!is_secret(key), "{key}");
        }
    }

    #[test]
    fn librdkafka_refusals_never_quote_a_secret() {
        // librdkafka quotes the value it refuses; kser masks secret ones.
        let config = KafkaConfig::new("b")
            .with_properties(&["sasl.password=hunter2", "my.secret.thing=hunter2"])
            .expect("valid syntax");
        let err = config.check().expect_err("unknown property");
        let text = err.to_string();
        assert!(text.contains("my.secret.thing"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        let config = KafkaConfig::new("b")
            .with_properties(&["linger.ms=soon"])
            .expect("valid syntax");
        let text = config.check().expect_err("bad value").to_string();
        assert!(text.contains("linger.ms"), "{text}");
        let config = KafkaConfig::new("b")
            .with_properties(&["sasl.password=hunter2", "linger.ms=5"])
            .expect("valid");
        config.check().expect("librdkafka takes these");
    }
}
