//! State that the gateway's replicas share. Policies that must hold across replicas (one-time
//! tokens today; shared rate limits later) go through here rather than talking to Redis
//! themselves, so the connection, its timeout and the key layout live in one place.

mod redis;

pub use self::redis::{slot, RedisStore, StoreError};
