//! libFuzzer target `config`: [`gpusnap_fuzz_bodies::config`] on each input,
//! under the capped allocator ([`gpusnap_fuzz_bodies::alloc::Capped`]).
#![no_main]

#[global_allocator]
static ALLOC: gpusnap_fuzz_bodies::alloc::Capped = gpusnap_fuzz_bodies::alloc::Capped;

libfuzzer_sys::fuzz_target!(|data: &[u8]| gpusnap_fuzz_bodies::config(data));
