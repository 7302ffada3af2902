//! Writes the hand-made seeds into `fuzz/corpus/<target>/seed-<name>`
//! (run from anywhere: the path is this crate's sibling).

fn main() -> std::io::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for s in fuzz_targets::seeds::all() {
        let dir = root.join(s.target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("seed-{}", s.name)), &s.data)?;
    }
    Ok(())
}
