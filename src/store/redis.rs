//! The shared Redis server: one multiplexed, self-reconnecting connection per config generation,
//! opened on first use (so a gateway starts, and serves routes that do not need Redis, while Redis
//! is down), every command bounded by the configured timeout. A standalone server, or a Redis
//! Cluster (`cluster: true`: the URL is a seed node; commands go to the node that owns their
//! key's slot, and multi-key scripts must keep their keys in one slot: see [`slot`]).

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OnceCell;

use crate::config::model::RedisConfig;

/// Why a shared-state operation failed. Callers fail closed on any of these.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis failed recently; not asked again yet")]
    Unavailable,
}

/// A Redis server (or cluster) shared by the replicas, with this gateway's key prefix.
pub struct RedisStore {
    client: Client,
    connection: OnceCell<Connection>,
    prefix: String,
    timeout: Duration,
}

enum Client {
    Single(redis::Client),
    Cluster(redis::cluster::ClusterClient),
}

#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

/// The cluster hash slot of a key (CRC16 of the key, or of its `{hash tag}`, mod 16384), as
/// Redis Cluster computes it: keys of one multi-key command must share it.
pub fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|&b| b == b'{').and_then(|open| {
        let close = bytes[open + 1..].iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &bytes[open + 1..open + 1 + close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(bytes)) % 16_384
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // the URL may hold a password
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl RedisStore {
    /// Checks the URL; connects later, on first use.
    pub fn from_config(config: &RedisConfig) -> Result<Self, String> {
        // the error text could echo the URL, and with it a password
        let unusable =
            |_| "not a usable Redis URL (`redis://[:PASSWORD@]HOST[:PORT][/DB]`)".to_owned();
        let client = if config.cluster {
            Client::Cluster(
                redis::cluster::ClusterClient::builder(vec![config.url.as_str()])
                    .connection_timeout(config.timeout.0)
                    .response_timeout(config.timeout.0)
                    .retries(1)
                    .build()
                    .map_err(unusable)?,
            )
        } else {
            Client::Single(redis::Client::open(config.url.as_str()).map_err(unusable)?)
        };
        Ok(Self {
            client,
            connection: OnceCell::new(),
            prefix: config.key_prefix.clone(),
            timeout: config.timeout.0,
        })
    }

    /// Sets `key` (under the prefix) for `ttl` unless it exists; true when this call set it.
    /// One atomic `SET NX PX`, so two replicas racing for the same key cannot both win.
    pub async fn set_if_absent(&self, key: &str, ttl: Duration) -> Result<bool, StoreError> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut command = redis::cmd("SET");
        command
            .arg(self.key(key))
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms);
        let reply: Option<String> = self.query(&command).await?;
        Ok(reply.is_some())
    }

    /// How long one command may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `name` under this gateway's key prefix.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Runs one command (whose keys the caller made with [`Self::key`]), within the timeout.
    pub async fn query<T: redis::FromRedisValue>(
        &self,
        command: &redis::Cmd,
    ) -> Result<T, StoreError> {
        self.bounded(async {
            match self.connection().await? {
                Connection::Single(mut connection) => command.query_async(&mut connection).await,
                Connection::Cluster(mut connection) => command.query_async(&mut connection).await,
            }
        })
        .await
    }

    /// Whether this is a Redis Cluster (multi-key scripts must group their keys by [`slot`]).
    pub fn is_cluster(&self) -> bool {
        matches!(self.client, Client::Cluster(_))
    }

    /// Runs a Lua script (`EVALSHA`, loading it when the server does not know it yet) with
    /// `keys` (made with [`Self::key`]) and `args`, within the timeout.
    pub async fn run_script<T: redis::FromRedisValue, A: redis::ToRedisArgs>(
        &self,
        script: &redis::Script,
        keys: &[String],
        args: &[A],
    ) -> Result<T, StoreError> {
        self.bounded(async {
            let mut invocation = script.prepare_invoke();
            for key in keys {
                invocation.key(key);
            }
            for arg in args {
                invocation.arg(arg);
            }
            match self.connection().await? {
                Connection::Single(mut connection) => {
                    invocation.invoke_async(&mut connection).await
                }
                Connection::Cluster(mut connection) => {
                    invocation.invoke_async(&mut connection).await
                }
            }
        })
        .await
    }

    async fn connection(&self) -> Result<Connection, redis::RedisError> {
        self.connection
            .get_or_try_init(|| async {
                match &self.client {
                    Client::Single(client) => {
                        let config = ConnectionManagerConfig::new()
                            .set_connection_timeout(self.timeout)
                            .set_response_timeout(self.timeout)
                            .set_number_of_retries(1);
                        ConnectionManager::new_with_config(client.clone(), config)
                            .await
                            .map(Connection::Single)
                    }
                    Client::Cluster(client) => {
                        client.get_async_connection().await.map(Connection::Cluster)
                    }
                }
            })
            .await
            .cloned()
    }

    async fn bounded<T>(
        &self,
        operation: impl std::future::Future<Output = Result<T, redis::RedisError>>,
    ) -> Result<T, StoreError> {
        let started = std::time::Instant::now();
        let result = match tokio::time::timeout(self.timeout, operation).await {
            Ok(result) => result.map_err(StoreError::from),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        };
        crate::telemetry::metrics::PROCESS.redis_command(started.elapsed(), result.is_ok());
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_redis_cluster_rules() {
        // values from the Redis Cluster specification's examples and `CLUSTER KEYSLOT`
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("123456789"), 12739);
        assert_eq!(slot("{user1000}.following"), slot("user1000"));
        assert_eq!(slot("foo{}{bar}"), slot("foo{}{bar}"));
        assert_ne!(slot("foo{}{bar}"), slot("bar"));
        assert_eq!(slot("foo{{bar}}zap"), slot("{bar"));
    }
}
