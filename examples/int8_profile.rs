//! Per-op-type time of one denoiser/classifier call on tract, planned exactly as the runtime
//! does (`diffshield::backend::tract::profile_ops`). Usage: int8_profile MODEL.onnx [reps]
//! [batch] [threads]; PROFILE_NODES=1 lists nodes instead of op types, PROFILE_TOP=N the N slowest.
use diffshield::backend::tract::{profile_ops, CpuThreads};

fn main() -> anyhow::Result<()> {
    // As the `diffshield` binary runs: freed model outputs stay mapped (see `memory`).
    diffshield::memory::keep_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).ok_or_else(|| {
        anyhow::anyhow!("usage: int8_profile MODEL.onnx [reps] [batch] [threads]")
    })?;
    let reps: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(10);
    let n: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(1);
    let threads = CpuThreads::new(args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(1))?;
    let per_node = std::env::var("PROFILE_NODES").is_ok();
    let profile = profile_ops(std::path::Path::new(path), n, reps, per_node, &threads)?;
    println!("{path}: {:.2} ms per call", profile.call_ms);
    let top = std::env::var("PROFILE_TOP").ok().and_then(|s| s.parse().ok()).unwrap_or(15);
    for op in profile.ops.iter().take(top) {
        println!("  {:30} {:8.3} ms  x{}", op.name, op.ms, op.nodes);
    }
    Ok(())
}
