//! The KV cache of incremental decoding: per layer, the rotated keys and the values of
//! every token seen so far, `[batch * kv_heads, capacity * head_dim]` preallocated, so a
//! new token writes its columns and attention reads the filled prefix.

/// Keys and values of the tokens seen so far.
#[derive(Debug)]
pub struct KvCache<T> {
    /// Per layer `(keys, values)`, allocated on the first step.
    pub(crate) layers: Vec<Option<(T, T)>>,
    /// Tokens per row already in the cache.
    pub(crate) len: usize,
    /// Tokens per row it can hold.
    pub(crate) capacity: usize,
    /// Rows (sequences).
    pub(crate) batch: usize,
}

impl<T> KvCache<T> {
    /// An empty cache for `layers` layers, `batch` rows of up to `capacity` tokens.
    pub fn new(layers: usize, batch: usize, capacity: usize) -> Self {
        KvCache {
            layers: (0..layers).map(|_| None).collect(),
            len: 0,
            capacity,
            batch,
        }
    }

    /// Tokens per row in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token has been cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens per row the cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}
