//! A minimal ONNX reader: a model's initializers (name, shape, element type, values) and its
//! nodes (name, op type, inputs), which is what naming and importing weights needs. The protobuf
//! wire format is read directly (ONNX's `onnx.proto3`: ModelProto.graph = 7; GraphProto.node = 1,
//! .initializer = 5; NodeProto.input = 1, .name = 3, .op_type = 4; TensorProto.dims = 1,
//! .data_type = 2, .float_data = 4, .name = 8, .raw_data = 9, .data_location = 14). Tensors
//! stored outside the file (external data) are refused.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{ModelError, Result};

/// ONNX's element type FLOAT (TensorProto.DataType).
pub const FLOAT: i32 = 1;

/// An initializer: a named constant tensor of the graph (the weights).
#[derive(Clone, Debug)]
pub struct Initializer {
    pub name: String,
    pub dims: Vec<usize>,
    /// TensorProto.DataType (1 = FLOAT).
    pub data_type: i32,
    /// Little-endian element bytes (`raw_data`, or `float_data` re-encoded).
    pub bytes: Vec<u8>,
}

impl Initializer {
    /// The values of a FLOAT initializer, row-major.
    pub fn f32_values(&self) -> std::result::Result<Vec<f32>, String> {
        if self.data_type != FLOAT {
            return Err(format!(
                "initializer {} has element type {}, not FLOAT",
                self.name, self.data_type
            ));
        }
        let count: usize = self.dims.iter().product();
        if self.bytes.len() != 4 * count {
            return Err(format!(
                "initializer {}: {} bytes for {count} floats of shape {:?}",
                self.name,
                self.bytes.len(),
                self.dims
            ));
        }
        Ok(self
            .bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
}

/// A node of the graph.
#[derive(Clone, Debug, Default)]
pub struct Node {
    pub name: String,
    pub op_type: String,
    pub inputs: Vec<String>,
}

/// What soup reads of an ONNX model.
#[derive(Debug, Default)]
pub struct Graph {
    pub initializers: Vec<Initializer>,
    pub nodes: Vec<Node>,
}

impl Graph {
    /// Reads `bytes` (a serialised ModelProto); `path` names it in errors.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self> {
        let bad = |e: String| ModelError::format(path, format!("not a readable ONNX model: {e}"));
        let mut graph = None;
        for field in Fields::new(bytes) {
            let (number, value) = field.map_err(bad)?;
            if number == 7 {
                graph = Some(value.bytes().map_err(bad)?);
            }
        }
        let graph = graph.ok_or_else(|| bad("no graph".into()))?;
        let mut out = Graph::default();
        for field in Fields::new(graph) {
            match field.map_err(bad)? {
                (1, v) => out.nodes.push(node(v.bytes().map_err(bad)?).map_err(bad)?),
                (5, v) => out
                    .initializers
                    .push(initializer(v.bytes().map_err(bad)?).map_err(bad)?),
                _ => {}
            }
        }
        Ok(out)
    }

    /// For each initializer, the nodes that take it as an input (name → nodes).
    pub fn consumers(&self) -> BTreeMap<&str, Vec<&Node>> {
        let names: std::collections::BTreeSet<&str> =
            self.initializers.iter().map(|i| i.name.as_str()).collect();
        let mut out: BTreeMap<&str, Vec<&Node>> = BTreeMap::new();
        for n in &self.nodes {
            for i in &n.inputs {
                if let Some(name) = names.get(i.as_str()) {
                    out.entry(name).or_default().push(n);
                }
            }
        }
        out
    }
}

fn node(bytes: &[u8]) -> std::result::Result<Node, String> {
    let mut n = Node::default();
    for field in Fields::new(bytes) {
        match field? {
            (1, v) => n.inputs.push(v.string()?),
            (3, v) => n.name = v.string()?,
            (4, v) => n.op_type = v.string()?,
            _ => {}
        }
    }
    Ok(n)
}

fn initializer(bytes: &[u8]) -> std::result::Result<Initializer, String> {
    let (mut name, mut dims, mut data_type) = (String::new(), Vec::new(), 0i32);
    let (mut raw, mut floats) = (None, Vec::new());
    for field in Fields::new(bytes) {
        match field? {
            (1, Value::Varint(d)) => dims.push(dim(d)?),
            (1, Value::Bytes(packed)) => {
                let mut rest = packed;
                while !rest.is_empty() {
                    let (d, used) = varint(rest)?;
                    dims.push(dim(d)?);
                    rest = &rest[used..];
                }
            }
            (2, Value::Varint(t)) => data_type = t as i32,
            (4, Value::Fixed32(b)) => floats.extend_from_slice(&b),
            (4, Value::Bytes(packed)) => floats.extend_from_slice(packed),
            (8, v) => name = v.string()?,
            (9, v) => raw = Some(v.bytes()?.to_vec()),
            (14, Value::Varint(1)) => {
                return Err(format!("initializer {name}: data stored outside the file"))
            }
            _ => {}
        }
    }
    let bytes = raw.unwrap_or(floats);
    Ok(Initializer {
        name,
        dims,
        data_type,
        bytes,
    })
}

fn dim(d: u64) -> std::result::Result<usize, String> {
    usize::try_from(d)
        .ok()
        .filter(|&d| d <= 1 << 32)
        .ok_or_else(|| format!("dimension {d} out of range"))
}

/// A field value in the protobuf wire format.
enum Value<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32([u8; 4]),
}

impl<'a> Value<'a> {
    fn bytes(self) -> std::result::Result<&'a [u8], String> {
        match self {
            Value::Bytes(b) => Ok(b),
            _ => Err("expected a length-delimited field".into()),
        }
    }

    fn string(self) -> std::result::Result<String, String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| "a string is not UTF-8".into())
    }
}

/// The fields of one protobuf message, in order: (field number, value).
struct Fields<'a> {
    rest: &'a [u8],
    failed: bool,
}

impl<'a> Fields<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self {
            rest: bytes,
            failed: false,
        }
    }

    fn next_field(&mut self) -> std::result::Result<(u64, Value<'a>), String> {
        let (key, used) = varint(self.rest)?;
        self.rest = &self.rest[used..];
        let take = |rest: &mut &'a [u8], n: usize| -> std::result::Result<&'a [u8], String> {
            if rest.len() < n {
                return Err(format!("a field of {n} bytes runs past the end"));
            }
            let (head, tail) = rest.split_at(n);
            *rest = tail;
            Ok(head)
        };
        let value = match key & 7 {
            0 => {
                let (v, used) = varint(self.rest)?;
                self.rest = &self.rest[used..];
                Value::Varint(v)
            }
            1 => {
                take(&mut self.rest, 8)?;
                Value::Fixed64
            }
            2 => {
                let (len, used) = varint(self.rest)?;
                self.rest = &self.rest[used..];
                let len = usize::try_from(len).map_err(|_| "length out of range".to_string())?;
                Value::Bytes(take(&mut self.rest, len)?)
            }
            5 => {
                let b = take(&mut self.rest, 4)?;
                Value::Fixed32([b[0], b[1], b[2], b[3]])
            }
            other => return Err(format!("wire type {other} is not supported")),
        };
        Ok((key >> 3, value))
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = std::result::Result<(u64, Value<'a>), String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() || self.failed {
            return None;
        }
        let field = self.next_field();
        self.failed = field.is_err();
        Some(field)
    }
}

/// A base-128 varint: (value, bytes used).
fn varint(bytes: &[u8]) -> std::result::Result<(u64, usize), String> {
    let mut value = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok((value, i + 1));
        }
    }
    Err("a truncated or overlong varint".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Protobuf encoding helpers for hand-made messages.
    fn key(field: u64, wire: u64) -> Vec<u8> {
        enc(field << 3 | wire)
    }
    fn enc(mut v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return out;
            }
            out.push(b | 0x80);
        }
    }
    fn len_field(field: u64, body: &[u8]) -> Vec<u8> {
        let mut out = key(field, 2);
        out.extend(enc(body.len() as u64));
        out.extend(body);
        out
    }

    #[test]
    fn initializers_and_nodes_are_read_in_every_encoding() {
        // Tensor a: packed dims, raw_data. Tensor b: unpacked dims, unpacked float_data.
        let mut a = len_field(1, &[enc(2), enc(3)].concat());
        a.extend(key(2, 0));
        a.extend(enc(1));
        a.extend(len_field(8, b"a"));
        let values: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        a.extend(len_field(9, &values));
        let mut b = Vec::new();
        for d in [2u64, 1] {
            b.extend(key(1, 0));
            b.extend(enc(d));
        }
        b.extend(key(2, 0));
        b.extend(enc(1));
        for v in [1.5f32, -2.0] {
            b.extend(key(4, 5));
            b.extend(v.to_le_bytes());
        }
        b.extend(len_field(8, b"b"));
        let mut n = len_field(1, b"x");
        n.extend(len_field(1, b"a"));
        n.extend(len_field(3, b"/m/MatMul"));
        n.extend(len_field(4, b"MatMul"));
        let mut graph = len_field(1, &n);
        graph.extend(len_field(5, &a));
        graph.extend(len_field(5, &b));
        let mut model = key(1, 0); // ir_version
        model.extend(enc(8));
        model.extend(len_field(7, &graph));
        let g = Graph::parse(Path::new("m.onnx"), &model).unwrap();
        assert_eq!(g.initializers.len(), 2);
        assert_eq!(g.initializers[0].dims, [2, 3]);
        assert_eq!(
            g.initializers[0].f32_values().unwrap(),
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
        );
        assert_eq!(g.initializers[1].dims, [2, 1]);
        assert_eq!(g.initializers[1].f32_values().unwrap(), [1.5, -2.0]);
        assert_eq!(g.nodes[0].inputs, ["x", "a"]);
        assert_eq!(g.consumers()["a"][0].name, "/m/MatMul");

        // Truncation anywhere is an error, never a panic or a silent partial read.
        for cut in 0..model.len() {
            assert!(
                Graph::parse(Path::new("m.onnx"), &model[..cut]).is_err(),
                "cut at {cut} read"
            );
        }
        assert!(Graph::parse(Path::new("m.onnx"), b"\xff\xff").is_err());
    }
}
