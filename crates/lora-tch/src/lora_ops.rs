//! LoRA-level operations on libtorch: the LoRA forward and backward as `mm`/`addmm_` with
//! the scaling on the small factors, and DoRA's per-feature scaling, output and backward
//! terms as broadcasting libtorch ops (the `LoraOps` defaults spread vectors with a
//! product and take several passes).

use lora_core::backend::{check_row_broadcast, check_same_shape};
use lora_core::{LoraGrads, LoraOps, Result, Tensor};

use crate::backend::Tch;
use crate::tensor::{TchTensor, tch_err};

impl LoraOps for Tch {
    fn lora_forward(
        &self,
        x: &TchTensor,
        a: &TchTensor,
        b: &TchTensor,
        scaling: f32,
        mask: Option<&TchTensor>,
        y: &mut TchTensor,
    ) -> Result<TchTensor> {
        let xm = Self::matrix(x)?;
        let x_lora = match mask {
            Some(m) => xm.f_mul(&Self::matrix(m)?).map_err(tch_err)?,
            None => xm,
        };
        let h = x_lora
            .f_mm(&a.inner().f_transpose(0, 1).map_err(tch_err)?)
            .map_err(tch_err)?;
        let hs = h.f_mul_scalar(f64::from(scaling)).map_err(tch_err)?;
        let (rows, out_f) = y.shape().as_matrix();
        let bt = b.inner().f_transpose(0, 1).map_err(tch_err)?;
        let mut view = y
            .make_mut()?
            .f_view([rows as i64, out_f as i64])
            .map_err(tch_err)?;
        let _ = view.f_addmm_(&hs, &bt).map_err(tch_err)?;
        TchTensor::new(h)
    }

    /// The backward as three `mm`s and one `addmm_` into `dx`, the scaling applied to the
    /// small `[n, r]` factors rather than to the products.
    fn lora_backward(
        &self,
        x: &TchTensor,
        a: &TchTensor,
        b: &TchTensor,
        scaling: f32,
        mask: Option<&TchTensor>,
        h: &TchTensor,
        dy: &TchTensor,
        dx: &mut TchTensor,
    ) -> Result<LoraGrads<TchTensor>> {
        let s = f64::from(scaling);
        let dym = Self::matrix(dy)?;
        let xm = Self::matrix(x)?;
        let x_lora = match mask {
            Some(m) => xm.f_mul(&Self::matrix(m)?).map_err(tch_err)?,
            None => xm,
        };
        let hs = Self::matrix(h)?.f_mul_scalar(s).map_err(tch_err)?;
        let d_b = dym
            .f_transpose(0, 1)
            .and_then(|t| t.f_mm(&hs))
            .map_err(tch_err)?;
        let gbs = dym
            .f_mm(b.inner())
            .and_then(|g| g.f_mul_scalar(s))
            .map_err(tch_err)?;
        let d_a = gbs
            .f_transpose(0, 1)
            .and_then(|t| t.f_mm(&x_lora))
            .map_err(tch_err)?;
        Self::accumulate_dx(dx, &gbs, a, mask)?;
        Ok(LoraGrads {
            d_a: TchTensor::new(d_a)?,
            d_b: TchTensor::new(d_b)?,
        })
    }

    fn scale_features(&self, t: &TchTensor, v: &TchTensor) -> Result<TchTensor> {
        check_row_broadcast(t.shape(), v.shape())?;
        TchTensor::new(t.inner().f_mul(v.inner()).map_err(tch_err)?)
    }

    fn dora_output(
        &self,
        y: &mut TchTensor,
        bias: Option<&TchTensor>,
        scale: &TchTensor,
    ) -> Result<TchTensor> {
        check_row_broadcast(y.shape(), scale.shape())?;
        let u = match bias {
            Some(b) => {
                check_row_broadcast(y.shape(), b.shape())?;
                y.inner().f_sub(b.inner()).map_err(tch_err)?
            }
            None => y.inner().shallow_clone(),
        };
        // bias + u ⊙ scale in one op.
        let out = match bias {
            Some(b) => b.inner().f_addcmul(&u, scale.inner()),
            None => u.f_mul(scale.inner()),
        }
        .map_err(tch_err)?;
        *y = TchTensor::new(out)?;
        TchTensor::new(u)
    }

    fn dora_backward_terms(
        &self,
        dy: &TchTensor,
        u: &TchTensor,
        scale: &TchTensor,
    ) -> Result<(TchTensor, TchTensor)> {
        check_row_broadcast(dy.shape(), scale.shape())?;
        let numer = self.dora_magnitude_numerator(dy, u)?;
        let scaled = dy.inner().f_mul(scale.inner()).map_err(tch_err)?;
        Ok((numer, TchTensor::new(scaled)?))
    }

    fn dora_magnitude_numerator(&self, dy: &TchTensor, u: &TchTensor) -> Result<TchTensor> {
        check_same_shape("dora_magnitude_numerator dy vs u", dy.shape(), u.shape())?;
        let numer = Tch::matrix(dy)?
            .f_mul(&Tch::matrix(u)?)
            .and_then(|p| p.f_sum_dim_intlist([0i64].as_slice(), false, tch::Kind::Float))
            .map_err(tch_err)?;
        TchTensor::new(numer)
    }
}

impl Tch {
    /// `dx += (s·G B) A`, masked when dropout was on; `dx` already holds the base's part.
    fn accumulate_dx(
        dx: &mut TchTensor,
        gbs: &tch::Tensor,
        a: &TchTensor,
        mask: Option<&TchTensor>,
    ) -> Result<()> {
        let (rows, in_f) = dx.shape().as_matrix();
        let mut view = dx
            .make_mut()?
            .f_view([rows as i64, in_f as i64])
            .map_err(tch_err)?;
        match mask {
            None => {
                let _ = view.f_addmm_(gbs, a.inner()).map_err(tch_err)?;
            }
            Some(m) => {
                let mm = Self::matrix(m)?;
                let part = gbs
                    .f_mm(a.inner())
                    .and_then(|p| p.f_mul(&mm))
                    .map_err(tch_err)?;
                let _ = view.f_add_(&part).map_err(tch_err)?;
            }
        }
        Ok(())
    }
}
