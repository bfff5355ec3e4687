//! Backend selection: the only place the binary turns `--device` into a Burn [`Device`].
//!
//! Flex (pure Rust, CPU) is always compiled in. CUDA and wgpu are opt-in cargo features of
//! this crate (`--features cuda`, `--features wgpu`); asking for one that was not compiled in
//! is an error that says how to rebuild. See docs/backends.md.

// Commands take `--device` one by one; until every one does, some items here have no caller
// in a given feature set.
#![allow(dead_code)]

use burn::tensor::Device;

/// A Burn backend the binary can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// Pure-Rust multi-threaded CPU backend (always available).
    Flex,
    /// NVIDIA GPUs through CUDA (needs `--features cuda`).
    Cuda,
    /// Vulkan / Metal / DirectX GPUs through wgpu (needs `--features wgpu`).
    Wgpu,
    /// Burn's JIT CPU backend, cubecl-cpu with fusion (needs `--features cpu`).
    Cpu,
}

impl Backend {
    /// The name used on the command line and in the cargo feature.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Flex => "flex",
            Backend::Cuda => "cuda",
            Backend::Wgpu => "wgpu",
            Backend::Cpu => "cpu",
        }
    }

    /// Whether this build of the binary can run on the backend.
    pub fn is_compiled_in(self) -> bool {
        match self {
            Backend::Flex => true,
            Backend::Cuda => cfg!(feature = "cuda"),
            Backend::Wgpu => cfg!(feature = "wgpu"),
            Backend::Cpu => cfg!(feature = "cpu"),
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The plain (non-autodiff) device for `backend`; call `.autodiff()` on it to train.
///
/// `index` picks the GPU: for CUDA the hardware index; for wgpu `0` is the adapter wgpu ranks
/// best (a discrete GPU when there is one, otherwise whatever is there, such as the lavapipe
/// CPU driver; `CUBECL_WGPU_DEFAULT_DEVICE` overrides it) and `n > 0` the `n`-th discrete GPU.
/// Flex has one device and accepts only `0`.
///
/// Devices are lazy; a GPU backend is probed with one tiny operation here, so that a missing
/// driver or GPU is an error naming the cause.
pub fn device(backend: Backend, index: usize) -> anyhow::Result<Device> {
    if !backend.is_compiled_in() {
        anyhow::bail!(
            "backend `{backend}` is not compiled in: rebuild with `--features {backend}`"
        );
    }
    let device = match backend {
        Backend::Flex => {
            anyhow::ensure!(
                index == 0,
                "backend `flex` has one device (index 0), not index {index}"
            );
            Ok(Device::flex())
        }
        Backend::Cuda => cuda(index),
        Backend::Wgpu => wgpu(index),
        Backend::Cpu => {
            anyhow::ensure!(
                index == 0,
                "backend `cpu` has one device (index 0), not index {index}"
            );
            cpu()
        }
    }?;
    if backend != Backend::Flex {
        probe(backend, &device)?;
    }
    Ok(device)
}

/// Runs one tiny operation on a lazily started backend, so that a missing driver or GPU is an
/// error naming the backend and the cause, not a panic in a device thread at the first real
/// operation (cudarc panics when it cannot load `libcuda`).
fn probe(backend: Backend, device: &Device) -> anyhow::Result<()> {
    use std::sync::{Arc, Mutex};
    let message: Arc<Mutex<Option<String>>> = Arc::default();
    let seen = message.clone();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let text = info
            .payload()
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| info.to_string());
        let mut slot = seen.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert(text);
    }));
    let on = device.clone();
    let result =
        std::panic::catch_unwind(move || burn::tensor::Tensor::<1>::zeros([1], &on).into_data());
    std::panic::set_hook(previous);
    if result.is_ok() {
        return Ok(());
    }
    let cause = message.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default();
    // cudarc's message lists 34 library names after its first clause: keep the clause.
    let cause = cause.split(" - searched for").next().unwrap_or_default();
    let cause: String = cause.chars().take(300).collect();
    anyhow::bail!(
        "backend `{backend}` could not start: {cause} (is the driver installed and a device \
         present? docs/backends.md)"
    )
}

#[cfg(feature = "cuda")]
fn cuda(index: usize) -> anyhow::Result<Device> {
    Ok(Device::cuda(index))
}

#[cfg(not(feature = "cuda"))]
fn cuda(_index: usize) -> anyhow::Result<Device> {
    unreachable!("checked by is_compiled_in")
}

#[cfg(feature = "cpu")]
fn cpu() -> anyhow::Result<Device> {
    Ok(Device::cpu())
}

#[cfg(not(feature = "cpu"))]
fn cpu() -> anyhow::Result<Device> {
    unreachable!("checked by is_compiled_in")
}

#[cfg(feature = "wgpu")]
fn wgpu(index: usize) -> anyhow::Result<Device> {
    use burn::tensor::DeviceKind;
    let kind = match index {
        0 => DeviceKind::DefaultDevice,
        n => DeviceKind::DiscreteGpu(n),
    };
    Ok(Device::wgpu(kind))
}

#[cfg(not(feature = "wgpu"))]
fn wgpu(_index: usize) -> anyhow::Result<Device> {
    unreachable!("checked by is_compiled_in")
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Tensor;
    use clap::ValueEnum;

    #[test]
    fn flex_device_runs_a_matmul() {
        let device = device(Backend::Flex, 0).unwrap();
        assert_eq!(device, Device::flex());
        let a = Tensor::<2>::from_floats([[1.0, 2.0], [3.0, 4.0]], &device);
        let b = Tensor::<2>::from_floats([[1.0, 0.0], [0.0, 1.0]], &device);
        let c = a.matmul(b).into_data().try_into_vec::<f32>().unwrap();
        assert_eq!(c, vec![1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn flex_rejects_a_nonzero_index() {
        let err = device(Backend::Flex, 1).unwrap_err().to_string();
        assert!(err.contains("index 1"), "{err}");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_not_compiled_in_says_how_to_rebuild() {
        let err = device(Backend::Cuda, 0).unwrap_err().to_string();
        assert_eq!(err, "backend `cuda` is not compiled in: rebuild with `--features cuda`");
    }

    #[cfg(not(feature = "wgpu"))]
    #[test]
    fn wgpu_not_compiled_in_says_how_to_rebuild() {
        let err = device(Backend::Wgpu, 0).unwrap_err().to_string();
        assert_eq!(err, "backend `wgpu` is not compiled in: rebuild with `--features wgpu`");
    }

    #[test]
    fn names_match_the_command_line() {
        for backend in Backend::value_variants() {
            let parsed = Backend::from_str(backend.name(), false).unwrap();
            assert_eq!(parsed, *backend);
        }
    }
}
