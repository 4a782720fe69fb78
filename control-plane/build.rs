//! Embeds `../migrations/*.sql` in the binary, in file-name order, so that `migrate` needs no
//! files at run time (the container image carries only the binary).

use std::{env, fs, path::PathBuf};

fn main() {
    let dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets this"))
        .join("..")
        .join("migrations");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .expect("migrations/ exists")
        .map(|e| e.expect("readable dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    files.sort();
    let mut out = String::from("&[\n");
    for path in files {
        let file = path
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("utf-8 name");
        let (version, name) = file
            .split_once('_')
            .unwrap_or_else(|| panic!("migration {file}: name must be NNNN_description.sql"));
        let version: i64 = version
            .parse()
            .unwrap_or_else(|_| panic!("migration {file}: must start with a number"));
        println!("cargo:rerun-if-changed={}", path.display());
        out.push_str(&format!(
            "    Migration {{ version: {version}, name: {name:?}, sql: include_str!({path:?}) }},\n",
            path = path.canonicalize().expect("path exists").display().to_string()
        ));
    }
    out.push(']');
    let dest = PathBuf::from(env::var("OUT_DIR").expect("cargo sets this")).join("migrations.rs");
    fs::write(dest, out).expect("OUT_DIR is writable");
}
