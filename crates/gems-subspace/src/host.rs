//! Moving matrices between Burn tensors and faer host matrices, and input checks.
//!
//! Decompositions run on the host in f64 (the tail of a spectrum needs it, BURN-NOTES.md);
//! per-step projections run on the tensor's own device. These conversions are the only places
//! data crosses between the two, so they are where shapes and finiteness are checked.

use burn::tensor::{Device, Tensor, TensorData};
use faer::{Mat, MatRef};

use crate::error::{Result, SubspaceError};

/// Copies a rank-2 tensor (any float dtype, any device) to a host f64 matrix.
///
/// This synchronises with the device: use it for refreshes, never per step.
///
/// # Errors
/// [`SubspaceError::TensorRead`] when the backend cannot read the tensor back.
pub fn matrix_from_tensor(tensor: &Tensor<2>) -> Result<Mat<f64>> {
    let [rows, cols] = tensor.dims();
    let data = tensor.to_data();
    let values: Vec<f64> = data.convert::<f64>().try_into_vec::<f64>().map_err(|e| {
        SubspaceError::TensorRead { op: "matrix_from_tensor", detail: format!("{e:?}") }
    })?;
    // Burn tensors are row-major.
    Ok(Mat::from_fn(rows, cols, |i, j| values[i * cols + j]))
}

/// The values of a rank-2 tensor as f32, row-major (rows x cols), read back from its device.
///
/// # Errors
/// [`SubspaceError::TensorRead`] when the backend cannot read the tensor back.
pub fn tensor_values_f32(tensor: &Tensor<2>) -> Result<Vec<f32>> {
    tensor.to_data().convert::<f32>().try_into_vec::<f32>().map_err(|e| SubspaceError::TensorRead {
        op: "tensor_values_f32",
        detail: format!("{e:?}"),
    })
}

/// Uploads a host matrix to `device` as an f32 tensor of the same shape.
pub fn tensor_from_matrix(matrix: MatRef<'_, f64>, device: &Device) -> Tensor<2> {
    let (rows, cols) = matrix.shape();
    let mut values = Vec::with_capacity(rows * cols);
    for i in 0..rows {
        for j in 0..cols {
            values.push(matrix[(i, j)] as f32);
        }
    }
    Tensor::from_data(TensorData::new(values, [rows, cols]), device)
}

/// Fails with [`SubspaceError::NonFinite`] when `matrix` holds NaN or an infinity.
pub(crate) fn ensure_finite(
    op: &'static str,
    what: &'static str,
    matrix: MatRef<'_, f64>,
) -> Result<()> {
    if matrix.is_all_finite() { Ok(()) } else { Err(SubspaceError::NonFinite { op, what }) }
}

/// Fails with [`SubspaceError::InvalidParameter`] when `rank` is zero.
pub(crate) fn ensure_rank(op: &'static str, rank: usize) -> Result<()> {
    if rank == 0 {
        Err(SubspaceError::invalid(op, "rank", 0, "a subspace needs rank >= 1"))
    } else {
        Ok(())
    }
}

/// A host matrix's f32 copy on one device, uploaded on first use and reused after, so that
/// per-step projections never cross the host-device boundary. The matrices it caches never
/// change after construction, so clones share the cache: cloning a
/// basis or an optimizer state does not upload again.
/// Uploads of cached host matrices (bases, null-space projectors) to a device in this process.
static UPLOADS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many times, in this process, a basis or null-space projector was copied from the host
/// to a device. A training step between refreshes should add nothing; for tests and
/// diagnostics.
pub fn device_uploads() -> u64 {
    UPLOADS.load(std::sync::atomic::Ordering::Relaxed)
}

#[derive(Debug, Default, Clone)]
pub(crate) struct DeviceCopy(std::sync::Arc<DeviceCopyInner>);

#[derive(Debug, Default)]
pub(crate) struct DeviceCopyInner {
    tensor: std::sync::Mutex<Option<Tensor<2>>>,
}

impl DeviceCopy {
    /// The cached tensor when it lives on `device`, else a fresh upload of `matrix`.
    pub(crate) fn get(&self, matrix: MatRef<'_, f64>, device: &Device) -> Tensor<2> {
        // A poisoned lock only means another thread panicked mid-upload: rebuild the cache.
        let mut cache = self.0.tensor.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tensor) = cache.as_ref().filter(|t| t.device() == *device) {
            return tensor.clone();
        }
        let tensor = tensor_from_matrix(matrix, device);
        UPLOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *cache = Some(tensor.clone());
        tensor
    }
}
