fn main() {
    lorakit_build::link_libtorch();
}
