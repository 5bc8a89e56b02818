// libublk.so carries the soname libublk.so.0. Its dynamic symbol table holds
// exactly the #[no_mangle] functions, all named ublk_* (rustc writes the
// cdylib's export list; `make test` checks it with nm).
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libublk.so.0");
    println!("cargo:rerun-if-changed=build.rs");
}
