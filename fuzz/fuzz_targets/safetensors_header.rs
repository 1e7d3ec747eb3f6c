//! Any bytes as a safetensors file: parsing never panics, and every tensor it accepts can be
//! decoded without reading out of bounds.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((start, tensors, _)) = glimpse::st::parse(data) {
        for info in tensors.values() {
            let (a, b) = info.data_offsets;
            let bytes = &data[start + a..start + b];
            let _ = glimpse::st::decode_f32(info.dtype, bytes);
        }
    }
});
