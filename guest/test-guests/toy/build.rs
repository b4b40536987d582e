//! Writes the toy's weights, a safetensors file (8-byte header length, JSON header, raw
//! little-endian f32 data), to `$OUT_DIR/toy.safetensors` for `src/lib.rs` to embed. The
//! values are small and exact in f32, so the host test can check every output bit by hand.

/// `proj.weight` [4, 3]: the first three outputs copy the features, the fourth mixes them.
const WEIGHT: [[f32; 3]; 4] = [
    [1.0, 0.0, 0.0],
    [0.0, 1.0, 0.0],
    [0.0, 0.0, 1.0],
    [0.5, -2.0, 3.0],
];
/// `proj.bias` [4].
const BIAS: [f32; 4] = [0.0, 0.0, 0.0, -1.0];

fn main() {
    let header = r#"{"proj.weight":{"dtype":"F32","shape":[4,3],"data_offsets":[0,48]},"proj.bias":{"dtype":"F32","shape":[4],"data_offsets":[48,64]}}"#;
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header.as_bytes());
    for v in WEIGHT.iter().flatten().chain(&BIAS) {
        file.extend_from_slice(&v.to_le_bytes());
    }
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").unwrap());
    std::fs::write(out.join("toy.safetensors"), file).unwrap();
    println!("cargo:rerun-if-changed=build.rs");
}
