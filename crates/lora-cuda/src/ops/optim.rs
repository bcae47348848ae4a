//! `OptimOps` for [`Cuda`]: the fused Adam/AdamW kernel.

use cudarc::driver::PushKernelArg;
use lora_core::backend::check_same_shape;
use lora_core::ops::AdamHyper;
use lora_core::{Error, OptimOps, Result, Tensor};

use crate::device::Cuda;
use crate::launch::{elems, launch};
use crate::tensor::CudaTensor;

/// Adam/AdamW as one kernel per tensor (the update of `p`, `m`, `v` fused); SGD uses the
/// default.
impl OptimOps for Cuda {
    fn adam_step(
        &self,
        params: &mut [&mut CudaTensor],
        grads: &[&CudaTensor],
        m: &mut [CudaTensor],
        v: &mut [CudaTensor],
        hp: &AdamHyper,
        step: u64,
    ) -> Result<()> {
        if params.len() != grads.len() || params.len() != m.len() || params.len() != v.len() {
            return Err(Error::state(
                "adam step",
                "parameter, gradient and state lists differ in length",
            ));
        }
        if step == 0 {
            return Err(Error::state("adam step", "step counts from 1"));
        }
        let t = step as i32;
        let bc1 = 1.0 - hp.beta1.powi(t);
        let inv_bc2 = 1.0 / (1.0 - hp.beta2.powi(t)).sqrt();
        let decoupled = i32::from(hp.decoupled);
        for (((p, g), m), v) in params
            .iter_mut()
            .zip(grads)
            .zip(m.iter_mut())
            .zip(v.iter_mut())
        {
            check_same_shape("adam step gradient", p.shape(), g.shape())?;
            let n64 = p.numel() as u64;
            let gd = g.data.clone();
            let (md, vd) = (m.make_mut(), v.make_mut());
            let cfg = elems(p.numel());
            launch!(
                self,
                "adam_step",
                cfg,
                p.make_mut(),
                &*gd,
                md,
                vd,
                &n64,
                &hp.lr,
                &hp.beta1,
                &hp.beta2,
                &hp.eps,
                &hp.weight_decay,
                &decoupled,
                &bc1,
                &inv_bc2
            );
        }
        Ok(())
    }
}
