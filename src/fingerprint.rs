//! FNV-1a, 64 bit: a small hash that is stable across platforms and Rust versions (unlike
//! `DefaultHasher`). It fingerprints model and data files (build.rs includes this file, so the
//! twin's recorded fingerprints and the runtime's check are the same function; attack reports
//! record them for `--resume`) and keys tune's cache.

/// FNV-1a 64 of `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(feature = "twin")]
/// FNV-1a 64 of an ONNX file's graph with the values of the f32 tensors `is_weight` names left
/// out: equal for two files that differ only in those weights (a retrained or fine-tuned model
/// exported by the same code), different for any other change (an op, an attribute, a shape, an
/// integer constant, a float constant not named). Names and doc strings of the model, graph and
/// nodes, value_info and model metadata are not part of it. Walks the protobuf wire format
/// directly, so build.rs and the runtime share this one function; `None` where the bytes are
/// not a well-formed protobuf message.
pub fn onnx_structure(onnx: &[u8], is_weight: &dyn Fn(&str) -> bool) -> Option<u64> {
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    let model = wire::fields(onnx)?;
    for f in &model {
        match f.number {
            // graph: the structure itself
            7 => {
                h.tag(f);
                wire::graph(f.bytes()?, &mut h, is_weight)?;
            }
            // ir_version, opset_import: they change what the ops mean
            1 | 8 => h.field(f),
            _ => {}
        }
    }
    Some(h.0)
}

#[cfg(feature = "twin")]
struct Fnv(u64);

#[cfg(feature = "twin")]
impl Fnv {
    fn eat(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn tag(&mut self, f: &wire::Field<'_>) {
        self.eat(&f.number.to_le_bytes());
        self.eat(&[f.kind]);
    }

    fn field(&mut self, f: &wire::Field<'_>) {
        self.tag(f);
        match f.value {
            wire::Value::Int(v) => self.eat(&v.to_le_bytes()),
            wire::Value::Bytes(b) => {
                self.eat(&(b.len() as u64).to_le_bytes());
                self.eat(b);
            }
        }
    }
}

/// Just enough of the protobuf wire format and the ONNX schema (onnx.proto field numbers) for
/// [`onnx_structure`].
#[cfg(feature = "twin")]
mod wire {
    use super::Fnv;

    pub(super) enum Value<'a> {
        Int(u64),
        Bytes(&'a [u8]),
    }

    pub(super) struct Field<'a> {
        pub(super) number: u64,
        pub(super) kind: u8,
        pub(super) value: Value<'a>,
    }

    impl<'a> Field<'a> {
        pub(super) fn bytes(&self) -> Option<&'a [u8]> {
            match self.value {
                Value::Bytes(b) => Some(b),
                Value::Int(_) => None,
            }
        }

        fn int(&self) -> Option<u64> {
            match self.value {
                Value::Int(v) => Some(v),
                Value::Bytes(_) => None,
            }
        }

        fn text(&self) -> Option<&'a str> {
            std::str::from_utf8(self.bytes()?).ok()
        }
    }

    fn varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *buf.get(*pos)?;
            *pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    /// The fields of one message, in file order.
    pub(super) fn fields(buf: &[u8]) -> Option<Vec<Field<'_>>> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < buf.len() {
            let key = varint(buf, &mut pos)?;
            let (number, kind) = (key >> 3, (key & 7) as u8);
            let len = match kind {
                0 => {
                    let v = varint(buf, &mut pos)?;
                    out.push(Field { number, kind, value: Value::Int(v) });
                    continue;
                }
                1 => 8,
                5 => 4,
                2 => usize::try_from(varint(buf, &mut pos)?).ok()?,
                // groups (3, 4) are not used by ONNX
                _ => return None,
            };
            let bytes = buf.get(pos..pos.checked_add(len)?)?;
            pos += len;
            out.push(Field { number, kind, value: Value::Bytes(bytes) });
        }
        Some(out)
    }

    /// GraphProto: node 1, name 2, initializer 5, doc_string 10, value_info 13.
    pub(super) fn graph(buf: &[u8], h: &mut Fnv, w: &dyn Fn(&str) -> bool) -> Option<()> {
        for f in &fields(buf)? {
            match f.number {
                1 => {
                    h.tag(f);
                    node(f.bytes()?, h, w)?;
                }
                5 => {
                    h.tag(f);
                    tensor(f.bytes()?, None, h, w)?;
                }
                2 | 10 | 13 => {}
                _ => h.field(f),
            }
        }
        Some(())
    }

    /// NodeProto: output 2, name 3, op_type 4, attribute 5, doc_string 6.
    fn node(buf: &[u8], h: &mut Fnv, w: &dyn Fn(&str) -> bool) -> Option<()> {
        let fs = fields(buf)?;
        let op = fs.iter().find(|f| f.number == 4).and_then(Field::text).unwrap_or("");
        let constant = op == "Constant";
        let output = fs.iter().find(|f| f.number == 2).and_then(Field::text);
        for f in &fs {
            match f.number {
                5 if at_default(op, f.bytes()?)? => {}
                5 => {
                    h.tag(f);
                    attribute(f.bytes()?, output.filter(|_| constant), h, w)?;
                }
                3 | 6 => {}
                _ => h.field(f),
            }
        }
        Some(())
    }

    /// True where a convolution's or pooling's attribute (AttributeProto: name 1, i 3, s 4, ints
    /// 8) spells out its ONNX default, which means the same as leaving it out: exporters differ
    /// in which of them they write (torch 2.x writes MaxPool's ceil_mode and dilations).
    fn at_default(op: &str, buf: &[u8]) -> Option<bool> {
        if !matches!(op, "Conv" | "ConvTranspose" | "MaxPool" | "AveragePool") {
            return Some(false);
        }
        let fs = fields(buf)?;
        let name = fs.iter().find(|f| f.number == 1).and_then(Field::text).unwrap_or("");
        let int = fs.iter().find(|f| f.number == 3).and_then(Field::int);
        let text = fs.iter().find(|f| f.number == 4).and_then(Field::text);
        let mut ints = Vec::new();
        for f in fs.iter().filter(|f| f.number == 8) {
            match f.value {
                Value::Int(v) => ints.push(v),
                Value::Bytes(b) => {
                    let mut pos = 0;
                    while pos < b.len() {
                        ints.push(varint(b, &mut pos)?);
                    }
                }
            }
        }
        let all_ones = !ints.is_empty() && ints.iter().all(|&v| v == 1);
        Some(match name {
            "dilations" | "strides" => all_ones,
            "ceil_mode" | "storage_order" | "count_include_pad" => int == Some(0),
            "group" => int == Some(1),
            "auto_pad" => text == Some("NOTSET"),
            _ => false,
        })
    }

    /// AttributeProto: t 5, g 6, tensors 10, graphs 11, doc_string 13.
    fn attribute(
        buf: &[u8],
        alias: Option<&str>,
        h: &mut Fnv,
        w: &dyn Fn(&str) -> bool,
    ) -> Option<()> {
        for f in &fields(buf)? {
            match f.number {
                5 | 10 => {
                    h.tag(f);
                    tensor(f.bytes()?, alias.filter(|_| f.number == 5), h, w)?;
                }
                6 | 11 => {
                    h.tag(f);
                    graph(f.bytes()?, h, w)?;
                }
                13 => {}
                _ => h.field(f),
            }
        }
        Some(())
    }

    /// TensorProto: data_type 2, float_data 4, name 8, raw_data 9, doc_string 12. The values of
    /// an f32 tensor that `w` names (by its own name or its Constant node's output) are left out,
    /// not their size.
    fn tensor(
        buf: &[u8],
        alias: Option<&str>,
        h: &mut Fnv,
        w: &dyn Fn(&str) -> bool,
    ) -> Option<()> {
        let fs = fields(buf)?;
        let float = fs.iter().any(|f| f.number == 2 && f.int() == Some(1));
        let name = fs.iter().find(|f| f.number == 8).and_then(Field::text);
        let weight = float && (name.is_some_and(w) || alias.is_some_and(w));
        for f in &fs {
            match (f.number, &f.value) {
                // the values go, their size stays
                (4 | 9, Value::Bytes(b)) if weight => {
                    h.tag(f);
                    h.eat(&(b.len() as u64).to_le_bytes());
                }
                (12, _) => {}
                _ => h.field(f),
            }
        }
        Some(())
    }
}

#[cfg(all(test, feature = "twin"))]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn int(n: u64, v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        varint(n << 3, &mut out);
        varint(v, &mut out);
        out
    }

    fn bytes(n: u64, b: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        varint((n << 3) | 2, &mut out);
        varint(b.len() as u64, &mut out);
        out.extend_from_slice(b);
        out
    }

    fn tensor(name: &str, data_type: u64, raw: &[u8]) -> Vec<u8> {
        [int(1, 2), int(2, data_type), bytes(8, name.as_bytes()), bytes(9, raw)].concat()
    }

    /// A model: a Conv node (`pads` attribute, `dilations` if given, packed) named `node`, a
    /// float initializer `w`, an int64 initializer `shape`, and a Constant node whose output `k`
    /// holds `konst`.
    fn model_with(
        node: &str,
        pads: u64,
        dilations: Option<&[u8]>,
        w: &[u8],
        shape: &[u8],
        konst: &[u8],
    ) -> Vec<u8> {
        let mut conv = [
            bytes(1, b"x"),
            bytes(1, b"w"),
            bytes(2, b"y"),
            bytes(3, node.as_bytes()),
            bytes(4, b"Conv"),
            bytes(5, &[bytes(1, b"pads"), int(3, pads)].concat()),
        ]
        .concat();
        if let Some(d) = dilations {
            conv.extend(bytes(5, &[bytes(1, b"dilations"), bytes(8, d)].concat()));
        }
        let constant = [
            bytes(2, b"k"),
            bytes(4, b"Constant"),
            bytes(5, &[bytes(1, b"value"), bytes(5, &tensor("", 1, konst))].concat()),
        ]
        .concat();
        let graph = [
            bytes(1, &conv),
            bytes(1, &constant),
            bytes(2, b"graph name"),
            bytes(5, &tensor("w", 1, w)),
            bytes(5, &tensor("shape", 7, shape)),
        ]
        .concat();
        [int(1, 8), bytes(2, b"pytorch"), bytes(7, &graph), bytes(8, &int(2, 17))].concat()
    }

    fn model(node: &str, pads: u64, w: &[u8], shape: &[u8], konst: &[u8]) -> Vec<u8> {
        model_with(node, pads, None, w, shape, konst)
    }

    #[test]
    fn the_structure_ignores_named_weights_and_names_and_sees_everything_else() {
        let weights = |n: &str| n == "w" || n == "k";
        let only_w = |n: &str| n == "w";
        let h = |m: &[u8], w: &dyn Fn(&str) -> bool| onnx_structure(m, w).expect("well-formed");
        let base = model("conv0", 1, &[1, 2, 3, 4], &[5; 8], &[0, 0, 0, 62]);
        let same = h(&base, &weights);
        assert_eq!(h(&model("conv0", 1, &[9, 9, 9, 9], &[5; 8], &[0, 0, 0, 62]), &weights), same);
        assert_eq!(h(&model("conv0", 1, &[1, 2, 3, 4], &[5; 8], &[1, 0, 0, 62]), &weights), same);
        assert_eq!(h(&model("renamed", 1, &[1, 2, 3, 4], &[5; 8], &[0, 0, 0, 62]), &weights), same);
        // An attribute spelled out at its default is no change; at another value it is.
        let k = [0, 0, 0, 62];
        let dil =
            |d: &[u8]| h(&model_with("conv0", 1, Some(d), &[1, 2, 3, 4], &[5; 8], &k), &weights);
        assert_eq!(dil(&[1, 1]), same);
        assert_ne!(dil(&[2, 2]), same);
        for other in [
            model("conv0", 2, &[1, 2, 3, 4], &[5; 8], &[0, 0, 0, 62]),
            model("conv0", 1, &[1, 2, 3, 4], &[6; 8], &[0, 0, 0, 62]),
            model("conv0", 1, &[1, 2, 3, 4, 5, 6, 7, 8], &[5; 8], &[0, 0, 0, 62]),
        ] {
            assert_ne!(h(&other, &weights), same);
        }
        // A float constant the table does not read is structure: the code may have inlined it.
        let k_changed = model("conv0", 1, &[1, 2, 3, 4], &[5; 8], &[1, 0, 0, 62]);
        assert_ne!(h(&k_changed, &only_w), h(&base, &only_w));
        assert_eq!(onnx_structure(&base[..base.len() - 1], &weights), None);
        assert_eq!(onnx_structure(&[0xff; 3], &weights), None);
    }
}
