//! The plumbing of the workspace's fused CPU kernels (gems-model's forward kernels, gems-optim's
//! optimizer step): whether a Burn tensor may take one, and its values to and from the host
//! without a copy; and the allocator settings of the workspace's binaries ([`allocator`]).
//! Layer 0: it depends on Burn alone, so every crate above may use it.

pub mod allocator;

use burn::tensor::{Device, Tensor, TensorData};

/// Elements per rayon task of a host kernel: large enough that scheduling costs nothing next
/// to the work.
pub const HOST_CHUNK: usize = 1 << 15;

/// Whether `x` may take a fused host kernel: it lives on flex, holds f32, and needs no graph
/// (`graph_free`: the caller knows no gradient is wanted through the call; a tensor without
/// autodiff needs none anyway).
pub fn host_kernel_applies<const D: usize>(x: &Tensor<D>, graph_free: bool) -> bool {
    (graph_free || !x.is_autodiff())
        && x.dtype() == burn::tensor::DType::F32
        && x.device().inner() == Device::flex()
}

/// The tensor's values on the host: zero-copy on flex when `x` is contiguous from offset 0 and
/// held once (the usual case for a fresh op output, or a buffer the caller owns), a copy
/// otherwise, so a kernel that writes into it never changes what another handle sees.
pub fn host_data<const D: usize>(x: Tensor<D>) -> TensorData {
    x.inner().into_data()
}

/// Host values back onto flex (wrapped for autodiff when `autodiff`), without a graph and
/// without a copy.
pub fn from_host<const D: usize>(data: TensorData, autodiff: bool) -> Tensor<D> {
    let t = Tensor::<D>::from_data(data, &Device::flex());
    if autodiff { Tensor::from_inner(t) } else { t }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_go_to_the_host_and_back_and_autodiff_needs_leave() {
        let device = Device::flex();
        let x =
            Tensor::<2>::from_data(TensorData::new(vec![1.0f32, -2.0, 3.5, 0.25], [2, 2]), &device);
        assert!(host_kernel_applies(&x, false));
        let data = host_data(x.clone());
        assert_eq!(data.clone().try_into_vec::<f32>().unwrap(), vec![1.0, -2.0, 3.5, 0.25]);
        let back: Tensor<2> = from_host(data, false);
        assert_eq!(back.into_data().try_into_vec::<f32>().unwrap(), vec![1.0, -2.0, 3.5, 0.25]);
        // A tensor on an autodiff device takes a host kernel only where no graph is wanted.
        let tracked =
            Tensor::<2>::from_data(TensorData::new(vec![1.0f32; 4], [2, 2]), &device.autodiff())
                .require_grad();
        assert!(!host_kernel_applies(&tracked, false));
        assert!(host_kernel_applies(&tracked, true));
    }
}
