//! A twin's weights, rebuilt at load time from the deployed ONNX file instead of a second copy
//! embedded in the binary: build.rs records, for every tensor of the burnpack burn-onnx writes,
//! which ONNX tensor holds the same values (verbatim, or transposed for a MatMul weight that
//! became a `Linear`), and embeds only the few tensors burn-onnx computed itself (folded
//! constants). The twin's binary is ~60 MB smaller, which is what lets a GPU stage (binary, models
//! and data under 64 MiB) carry it.
//!
//! The caller has already checked the file's fingerprint against the one the twin was generated
//! from, so the table applies to exactly these bytes; every lookup is still checked (name, type,
//! element count) and a mismatch is an error, never a silently wrong twin.

use crate::error::{Error, Result};
use burn_store::burn_pack::{Bytes, DType, Reader, Tensor, Writer};
use std::path::Path;
use tract_onnx::pb;
use tract_onnx::prelude::Framework as _;

/// One tensor of a twin: the key burn-onnx gave it and where its values lie in the ONNX file.
pub(crate) struct FromOnnx {
    /// The tensor's path in the burn module (`conv2d1.weight`).
    pub(crate) key: &'static str,
    /// The ONNX initializer, or the output of the Constant node, that holds its values.
    pub(crate) onnx: &'static str,
    /// The burn tensor's shape.
    pub(crate) shape: &'static [usize],
    /// The ONNX tensor is the 2-D transpose of the burn one.
    pub(crate) transpose: bool,
}

/// ONNX's `TensorProto.DataType.FLOAT`.
const ONNX_FLOAT: i32 = 1;

/// The burnpack of a twin: the tensors `table` names, read from `onnx` (the bytes of `path`),
/// and the embedded `rest`.
pub(crate) fn burnpack(
    path: &Path,
    onnx: &[u8],
    table: &[FromOnnx],
    rest: &'static [u8],
) -> Result<Bytes> {
    let bad = |reason: String| Error::ModelLoad { path: path.into(), reason };
    let model = tract_onnx::onnx()
        .proto_model_for_read(&mut &onnx[..])
        .map_err(|e| bad(format!("parsing ONNX for the twin's weights: {e}")))?;
    let graph = model.graph.as_ref().ok_or_else(|| bad("ONNX model without a graph".into()))?;
    let mut tensors = Reader::from_bytes(Bytes::from_bytes_vec(rest.to_vec()))
        .and_then(Reader::into_tensors)
        .map_err(|e| Error::Backend(format!("the twin's embedded tensors: {e}")))?;
    for entry in table {
        let t = find(graph, entry.onnx)
            .ok_or_else(|| bad(format!("the twin's tensor {:?} is not in the file", entry.onnx)))?;
        let values = f32_bytes(t)
            .ok_or_else(|| bad(format!("ONNX tensor {:?} is not stored f32 data", entry.onnx)))?;
        let count: usize = entry.shape.iter().product();
        if values.len() != count * 4 {
            return Err(bad(format!(
                "ONNX tensor {:?} has {} values, the twin's {} needs {count}",
                entry.onnx,
                values.len() / 4,
                entry.key
            )));
        }
        let values = match (entry.transpose, entry.shape) {
            (false, _) => values,
            // The burn tensor is [rows, cols]; the ONNX one [cols, rows].
            (true, &[rows, cols]) => transposed(&values, cols, rows),
            (true, _) => return Err(Error::Backend(format!("twin table: {} not 2-D", entry.key))),
        };
        tensors.push(Tensor::new(
            entry.key.to_string(),
            DType::F32,
            entry.shape.to_vec(),
            None,
            Bytes::from_bytes_vec(values),
        ));
    }
    Writer::new(tensors)
        .into_bytes()
        .map_err(|e| Error::Backend(format!("assembling the twin's weights: {e}")))
}

/// The initializer called `name`, or the value of the Constant node whose output it is.
fn find<'a>(graph: &'a pb::GraphProto, name: &str) -> Option<&'a pb::TensorProto> {
    graph.initializer.iter().find(|t| t.name == name).or_else(|| {
        graph
            .node
            .iter()
            .filter(|n| n.op_type == "Constant" && n.output.first().is_some_and(|o| o == name))
            .find_map(|n| n.attribute.iter().find(|a| a.name == "value")?.t.as_ref())
    })
}

/// The tensor's values as little-endian f32 bytes, if it holds f32 data in the file itself.
fn f32_bytes(t: &pb::TensorProto) -> Option<Vec<u8>> {
    if t.data_type != ONNX_FLOAT || !t.external_data.is_empty() {
        return None;
    }
    if t.raw_data.is_empty() {
        Some(t.float_data.iter().flat_map(|v| v.to_le_bytes()).collect())
    } else {
        Some(t.raw_data.clone())
    }
}

/// `bytes` as a row-major [rows, cols] f32 matrix, transposed.
fn transposed(bytes: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let mut t = vec![0u8; bytes.len()];
    for r in 0..rows {
        for c in 0..cols {
            let (from, to) = ((r * cols + c) * 4, (c * rows + r) * 4);
            t[to..to + 4].copy_from_slice(&bytes[from..from + 4]);
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_moves_each_value_to_its_mirror() {
        let m: Vec<u8> = (0..6u8).flat_map(|v| f32::from(v).to_le_bytes()).collect();
        let t = transposed(&m, 2, 3);
        let values: Vec<f32> =
            t.chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        assert_eq!(values, [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
    }
}
