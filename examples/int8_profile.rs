//! Per-op-type time of one denoiser/classifier call on tract, optimised exactly as the runtime
//! does (`diffshield::backend::tract_opt::optimise`). Usage: int8_profile MODEL.onnx [reps] [batch]
use std::collections::HashMap;
use std::time::Instant;
use tract_onnx::prelude::*;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = &args[1];
    let reps: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(10);
    let n: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(1);
    let model = tract_onnx::onnx().model_for_path(path)?;
    let den = model.input_outlets()?.len() == 2;
    let direct = diffshield::backend::tract_opt::own_kernels_enabled();
    let typed = diffshield::backend::tract_opt::prepare(model.into_typed()?, direct)?;
    let TDim::Sym(b) = typed.input_fact(0)?.shape[0].clone() else { anyhow::bail!("batch") };
    let subs = HashMap::from([(b, TDim::from(n as i64))]);
    let plan =
        diffshield::backend::tract_opt::optimise(typed.set_symbols(&subs)?)?.into_runnable()?;
    let mut state = plan.spawn()?;
    let x = tract_ndarray::Array4::from_shape_fn((n, 3, 32, 32), |(_, c, h, w)| {
        ((c * 5 + h * 3 + w) % 29) as f32 / 14.0 - 1.0
    });
    let mut inputs: TVec<TValue> = tvec![x.into_tensor().into_tvalue()];
    if den {
        inputs.push(tract_ndarray::Array1::from_elem(n, 140f32).into_tensor().into_tvalue());
    }
    state.run(inputs.clone())?;
    let mut by_op: HashMap<String, (f64, usize)> = HashMap::new();
    let t0 = Instant::now();
    for _ in 0..reps {
        state.run_plan_with_eval(inputs.clone(), |s, st, node, inp| {
            let t = Instant::now();
            let r = tract_onnx::tract_core::plan::eval(s, st, node, inp);
            let key = if std::env::var("PROFILE_NODES").is_ok() {
                format!("{} {}", node.op.name(), node.name)
            } else {
                node.op.name().to_string()
            };
            let e = by_op.entry(key).or_default();
            e.0 += t.elapsed().as_secs_f64() * 1e3 / reps as f64;
            e.1 += 1;
            r
        })?;
    }
    let total = t0.elapsed().as_secs_f64() * 1e3 / reps as f64;
    let mut v: Vec<_> = by_op.into_iter().collect();
    v.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    println!("{path}: {total:.2} ms per call");
    for (k, (ms, c)) in
        v.iter().take(std::env::var("PROFILE_TOP").ok().and_then(|s| s.parse().ok()).unwrap_or(15))
    {
        println!("  {k:30} {ms:8.3} ms  x{}", c / reps);
    }
    Ok(())
}
