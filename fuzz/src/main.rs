//! `lora-fuzz <target>`: AFL++'s persistent-mode harness over one target of `lora-fuzz`
//! (`cargo xtask fuzz` starts one per target; `lora-fuzz --list` names them). A panic is
//! reported to AFL as a crash.

fn main() {
    let target = std::env::args().nth(1).unwrap_or_default();
    if target == "--list" {
        for (name, _) in lora_fuzz::TARGETS {
            println!("{name}");
        }
        return;
    }
    if let Err(e) = lora_fuzz::run(&target, b"") {
        eprintln!("{e}; targets: {:?}", lora_fuzz::TARGETS.map(|t| t.0));
        std::process::exit(2);
    }
    afl::fuzz!(|data: &[u8]| {
        let _ = lora_fuzz::run(&target, data);
    });
}
