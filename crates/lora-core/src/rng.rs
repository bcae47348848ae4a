//! The shared counter-based random number generator.
//!
//! Every backend must produce the *same* initial adapters and the *same* dropout masks for
//! the same seed, bit for bit, so that a run on CUDA can be compared with the ndarray
//! reference element by element. A counter-based generator makes that cheap: element `i`
//! of a stream is a pure function of `(seed, stream, i)`, so a GPU thread can compute its
//! own element without any sequential state.
//!
//! The generator is Philox4x32-10 (Salmon et al., SC'11, the generator behind
//! `torch.cuda`'s and cuRAND's default streams). Mapping of an element index to Philox:
//!
//! * key     = `[seed as u32, (seed >> 32) as u32]`
//! * counter = `[block as u32, (block >> 32) as u32, stream as u32, (stream >> 32) as u32]`
//!   where `block = index / 4`,
//! * the element is word `index % 4` of the output,
//! * a uniform float in `[0, 1)` is `(word >> 8) * 2^-24` (24 random mantissa bits, exact
//!   in f32).
//!
//! A CUDA kernel that follows these four lines reproduces this module exactly.

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

#[inline]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = u64::from(a) * u64::from(b);
    ((p >> 32) as u32, p as u32)
}

/// One Philox4x32-10 block: ten rounds over a 128-bit counter with a 64-bit key.
#[inline]
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let (hi0, lo0) = mulhilo(M0, c[0]);
        let (hi1, lo1) = mulhilo(M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// Converts a random word to a uniform float in `[0, 1)` using its top 24 bits.
#[inline]
pub fn word_to_unit_f32(word: u32) -> f32 {
    (word >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// The random word at `index` of stream `stream` under `seed`.
#[inline]
pub fn word_at(seed: u64, stream: u64, index: u64) -> u32 {
    let block = index / 4;
    let out = philox4x32_10(
        [
            block as u32,
            (block >> 32) as u32,
            stream as u32,
            (stream >> 32) as u32,
        ],
        [seed as u32, (seed >> 32) as u32],
    );
    out[(index % 4) as usize]
}

/// A position in a random stream: `(seed, stream)` names the stream, `offset` is the
/// index of the next element to draw. Consumers advance `offset` by a multiple of 4 so
/// that every draw starts on a Philox block boundary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RngState {
    /// The user's seed (the Philox key).
    pub seed: u64,
    /// Which stream (e.g. one per layer and purpose), see [`stream_id`].
    pub stream: u64,
    /// Index of the next element.
    pub offset: u64,
}

impl RngState {
    /// A fresh stream at offset 0.
    pub fn new(seed: u64, stream: u64) -> Self {
        RngState {
            seed,
            stream,
            offset: 0,
        }
    }

    /// Reserves `n` elements and returns the state at which they start; the stream moves
    /// on by `n` rounded up to a whole Philox block.
    pub fn advance(&mut self, n: usize) -> RngState {
        let start = *self;
        self.offset += (n as u64).div_ceil(4) * 4;
        start
    }

    /// Fills `out` with uniform floats in `[0, 1)`, starting at this state's offset,
    /// without advancing (see [`RngState::advance`]).
    pub fn fill_uniform(&self, out: &mut [f32]) {
        let mut index = self.offset;
        let mut chunks = out.chunks_mut(4);
        // The offset is block aligned whenever it came from `advance`, but stay correct
        // for any offset by falling back to per-element lookups.
        if !index.is_multiple_of(4) {
            for v in out.iter_mut() {
                *v = word_to_unit_f32(word_at(self.seed, self.stream, index));
                index += 1;
            }
            return;
        }
        let key = [self.seed as u32, (self.seed >> 32) as u32];
        for chunk in &mut chunks {
            let block = index / 4;
            let words = philox4x32_10(
                [
                    block as u32,
                    (block >> 32) as u32,
                    self.stream as u32,
                    (self.stream >> 32) as u32,
                ],
                key,
            );
            for (v, w) in chunk.iter_mut().zip(words) {
                *v = word_to_unit_f32(w);
            }
            index += 4;
        }
    }
}

/// A stable stream id for a named purpose (FNV-1a over the bytes), so that a layer's
/// dropout and init streams depend on its dotted name, not on construction order.
pub fn stream_id(name: &str, purpose: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes().chain([0u8]).chain(purpose.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Dropout keep-mask values at `state`: `1/(1-p)` where the uniform draw is `>= p`,
/// else `0` (the inverted dropout of `torch.nn.Dropout`).
pub fn dropout_mask(state: RngState, p: f32, out: &mut [f32]) {
    state.fill_uniform(out);
    let keep = 1.0 / (1.0 - p);
    for v in out.iter_mut() {
        *v = if *v >= p { keep } else { 0.0 };
    }
}

/// Uniform floats in `[low, high)`.
pub fn uniform(state: RngState, low: f32, high: f32, out: &mut [f32]) {
    state.fill_uniform(out);
    for v in out.iter_mut() {
        *v = low + (high - low) * *v;
    }
}

/// Normal floats with the given mean and standard deviation (Box-Muller over pairs of
/// consecutive uniforms).
pub fn normal(state: RngState, mean: f32, std: f32, out: &mut [f32]) {
    let mut u = vec![0.0f32; out.len() * 2];
    state.fill_uniform(&mut u);
    for (v, pair) in out.iter_mut().zip(u.chunks_exact(2)) {
        // 1 - u is in (0, 1], so the log is finite.
        let r = (-2.0 * f64::from(1.0 - pair[0]).ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * f64::from(pair[1]);
        *v = mean + std * (r * theta.cos()) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Known-answer vectors from the Random123 distribution (kat_vectors, philox4x32 10).
    #[test]
    fn philox_known_answers() {
        assert_eq!(
            philox4x32_10([0, 0, 0, 0], [0, 0]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn block_fill_matches_elementwise_lookup() {
        let st = RngState {
            seed: 42,
            stream: 7,
            offset: 8,
        };
        let mut a = vec![0.0; 11];
        st.fill_uniform(&mut a);
        for (i, v) in a.iter().enumerate() {
            assert_eq!(*v, word_to_unit_f32(word_at(42, 7, 8 + i as u64)));
        }
    }

    #[test]
    fn dropout_keep_rate_is_close_to_one_minus_p() {
        let mut m = vec![0.0; 100_000];
        dropout_mask(RngState::new(1, 2), 0.25, &mut m);
        let kept = m.iter().filter(|v| **v > 0.0).count() as f64 / m.len() as f64;
        assert!((kept - 0.75).abs() < 0.01, "kept {kept}");
        assert!(
            m.iter()
                .all(|v| *v == 0.0 || (*v - 1.0 / 0.75).abs() < 1e-7)
        );
    }

    #[test]
    fn advance_rounds_to_blocks() {
        let mut s = RngState::new(3, 4);
        assert_eq!(s.advance(5).offset, 0);
        assert_eq!(s.offset, 8);
    }
}
