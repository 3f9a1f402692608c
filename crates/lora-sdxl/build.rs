//! Links libtorch (rpath, see lorakit-build) and compiles the C++ shim
//! (csrc/shim.cpp: gradient checkpointing and optimizer kernels; csrc/device.cpp:
//! versions and CUDA memory figures; csrc/dist.cpp: c10d collectives) against the same libtorch headers
//! torch-sys uses.

fn main() {
    let lib = lorakit_build::link_libtorch();
    let version = lib
        .as_deref()
        .and_then(lorakit_build::libtorch_version)
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=LORAKIT_LIBTORCH_VERSION={version}");
    println!("cargo:rerun-if-changed=csrc/shim.cpp");
    println!("cargo:rerun-if-changed=csrc/device.cpp");
    println!("cargo:rerun-if-changed=csrc/dist.cpp");
    println!("cargo:rerun-if-changed=csrc/errors.h");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let Some(lib) = lib else {
        panic!("lora-sdxl: torch-sys did not report the libtorch directory (DEP_TCH_LIBTORCH_LIB); run scripts/setup-libtorch.sh or set LIBTORCH");
    };
    let root = lib
        .parent()
        .expect("libtorch lib dir has a parent")
        .to_path_buf();
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .file("csrc/shim.cpp")
        .file("csrc/device.cpp")
        .file("csrc/dist.cpp")
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .warnings(false)
        .compile("lorakit_shim");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}
