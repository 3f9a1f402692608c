fn main() {
    let lib = lorakit_build::link_libtorch();
    let version = lib
        .as_deref()
        .and_then(lorakit_build::libtorch_version)
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=LORAKIT_LIBTORCH_VERSION={version}");
}
