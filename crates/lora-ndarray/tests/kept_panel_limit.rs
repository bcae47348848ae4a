//! The budget of the frozen weights' packed copies (`sgemm/prepacked.rs`), in a process of
//! its own: the budget is process-wide, and the library's unit tests expect copies.

use lora_core::Result;
use lora_core::backend::{Backend, Transpose};
use lora_ndarray::{NdArray, NdTensor, pool};

fn tensor(shape: &[usize], seed: u32) -> Result<NdTensor> {
    let n = shape.iter().product::<usize>();
    let v = (0..n as u32)
        .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 * 1e-3 - 0.5)
        .collect();
    NdTensor::from_vec(v, shape)
}

/// Three `x Wᵀ` products with `w` (the second makes a copy where the budget allows).
fn use_thrice(b: &NdArray, x: &NdTensor, w: &NdTensor) -> Result<()> {
    for _ in 0..3 {
        b.matmul(1.0, (x, Transpose::No), (w, Transpose::Yes), &[256, 192])?;
    }
    Ok(())
}

#[test]
fn the_limit_bounds_the_kept_copies_a_raised_limit_serves_weights_used_before_and_dropping_frees()
-> Result<()> {
    if !pool::own_kernels() {
        eprintln!("skipped: no AVX2+FMA, so our GEMM (which keeps copies) does not run here");
        return Ok(());
    }
    let b = NdArray::new();
    let x = tensor(&[256, 128], 1)?;
    pool::set_kept_panel_limit(0);
    let w = tensor(&[192, 128], 2)?;
    use_thrice(&b, &x, &w)?;
    assert_eq!(
        pool::stats().kept_panel_bytes,
        0,
        "a zero limit keeps nothing"
    );

    pool::set_kept_panel_limit(1 << 30);
    let w2 = tensor(&[192, 128], 3)?;
    use_thrice(&b, &x, &w2)?;
    // 128 steps of 192 columns, rounded up to whole panels (16 or 48 wide): 192 either way.
    let one = 128 * 192 * 4;
    assert_eq!(pool::stats().kept_panel_bytes, one, "one copy of w2ᵀ");
    // The first weight was used while the limit was 0; now there is room, it gets its copy.
    use_thrice(&b, &x, &w)?;
    assert_eq!(
        pool::stats().kept_panel_bytes,
        2 * one,
        "w's copy once there is room"
    );

    let w3 = tensor(&[192, 128], 4)?;
    pool::set_kept_panel_limit(2 * one + 1);
    use_thrice(&b, &x, &w3)?;
    assert_eq!(pool::stats().kept_panel_bytes, 2 * one, "no room for w3ᵀ");

    drop(w2);
    assert_eq!(
        pool::stats().kept_panel_bytes,
        one,
        "dropping w2 frees its copy"
    );
    drop(w);
    assert_eq!(pool::stats().kept_panel_bytes, 0, "and w's");
    Ok(())
}
