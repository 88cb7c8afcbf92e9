//! The console's state: the store it reads, the registry and workers whose
//! entrypoints it shows, the broker it sends to, and its token.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use serde_json::Value;

use crate::config::KafkaConfig;
use crate::producer::Producer;
use crate::registry::Registry;
use crate::store::Store;

use super::extract::ApiError;

/// The environment variable holding the console's token.
pub const TOKEN_VARIABLE: &str = "KSER_HTTP_TOKEN";

/// Errors from building a [`Console`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsoleError {
    /// The producer for the actions that send could not be made.
    #[error(transparent)]
    Producer(#[from] crate::producer::ProducerError),
}

/// What the console serves: the store it reads, the cluster it sends to.
#[derive(Clone)]
pub struct Console {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) store: Store,
    /// The entrypoints of the binary serving the console (the workers'
    /// own, from `kser.workers`, are added when shown).
    pub(super) registry: Registry,
    /// Settings for dead-letter replays; `None`: nothing can be sent.
    pub(super) kafka: Option<KafkaConfig>,
    pub(super) producer: Option<Producer>,
    /// Where `POST /api/v1/send` publishes unless told otherwise.
    pub(super) topic: String,
    pub(super) token: Option<String>,
    /// Topics already checked or created by a send.
    pub(super) ensured: Mutex<HashSet<String>>,
}

impl Console {
    /// A console on `store`, sending through `kafka` when given (sends and
    /// replays answer 503 without it), to `topic` by default. Its token is
    /// [`TOKEN_VARIABLE`]'s value when set and not empty.
    pub fn new(
        store: Store,
        registry: &Registry,
        kafka: Option<KafkaConfig>,
        topic: impl Into<String>,
    ) -> Result<Self, ConsoleError> {
        let producer = match &kafka {
            Some(kafka) => Some(Producer::new(kafka)?),
            None => None,
        };
        let token = std::env::var(TOKEN_VARIABLE)
            .ok()
            .filter(|token| !token.trim().is_empty());
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                registry: registry.clone(),
                kafka,
                producer,
                topic: topic.into(),
                token,
                ensured: Mutex::new(HashSet::new()),
            }),
        })
    }

    /// The registry of the binary serving the console.
    pub(super) fn registry_view(&self) -> &Registry {
        &self.inner.registry
    }

    pub(super) fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The producer, or 503 when the console was built without a broker.
    pub(super) fn producer(&self) -> Result<&Producer, ApiError> {
        self.inner.producer.as_ref().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "this console has no broker configured: it cannot send",
            )
        })
    }

    pub(super) fn kafka(&self) -> Result<&KafkaConfig, ApiError> {
        self.inner.kafka.as_ref().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "this console has no broker configured",
            )
        })
    }

    /// Creates `topic` if missing, once per topic and process.
    pub(super) async fn ensure_topic(&self, topic: &str) -> Result<(), ApiError> {
        let known = self
            .inner
            .ensured
            .lock()
            .map(|set| set.contains(topic))
            .unwrap_or(false);
        if known {
            return Ok(());
        }
        crate::admin::ensure_topics(
            self.kafka()?,
            &[topic.to_owned()],
            crate::admin::TopicLayout::default(),
        )
        .await
        .map_err(|err| ApiError::new(StatusCode::BAD_GATEWAY, err.to_string()))?;
        if let Ok(mut set) = self.inner.ensured.lock() {
            set.insert(topic.to_owned());
        }
        Ok(())
    }

    /// The entrypoints known to this binary and to the registered workers,
    /// by name, each with its kind, description and parameter schema.
    pub(super) async fn entrypoints(&self) -> Result<Vec<Value>, ApiError> {
        let mut known: BTreeMap<String, Value> = BTreeMap::new();
        for worker in self.store().workers().await? {
            for entry in worker.entrypoints.as_array().into_iter().flatten() {
                if let Some(name) = entry.get("name").and_then(Value::as_str) {
                    known
                        .entry(name.to_owned())
                        .or_insert_with(|| entry.clone());
                }
            }
        }
        for entry in self.inner.registry.entrypoints() {
            known.insert(
                entry.name.to_owned(),
                serde_json::to_value(entry).unwrap_or_default(),
            );
        }
        Ok(known.into_values().collect())
    }
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("topic", &self.inner.topic)
            .field("token", &self.inner.token.as_ref().map(|_| "<set>"))
            .finish_non_exhaustive()
    }
}
