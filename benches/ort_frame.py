"""onnxruntime sessions and the defended frame in numpy + onnxruntime (noising, 14 DDIM steps at T*=140 stride 10, eta 1,
classifier), shared by the onnxruntime comparison scripts so they time the same loop."""
import numpy as np
import onnxruntime as ort

betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
abar = np.concatenate([[1.0], np.cumprod(1 - betas)])
taus = list(range(140, -1, -10))
rng = np.random.default_rng(0)


def session(path, threads):
    """An onnxruntime CPU session with `threads` intra-op threads, run sequentially."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def frame(den, clf, x):
    x0 = 2 * x - 1
    a = abar[140]
    xt = (np.sqrt(a) * x0 + np.sqrt(1 - a) * rng.standard_normal(x.shape)).astype(np.float32)
    for t, s in zip(taus[:-1], taus[1:]):
        eps = den.run(None, {"x_t": xt, "t": np.full((x.shape[0],), t, np.float32)})[0]
        at, as_ = abar[t], abar[s]
        x0h = np.clip((xt - np.sqrt(1 - at) * eps) / np.sqrt(at), -1, 1)
        sig = np.sqrt((1 - as_) / (1 - at)) * np.sqrt(1 - at / as_)
        xt = (np.sqrt(as_) * x0h + np.sqrt(max(0.0, 1 - as_ - sig**2)) * eps
              + sig * rng.standard_normal(x.shape)).astype(np.float32)
    img = np.clip((xt + 1) / 2, 0, 1).astype(np.float32)
    return clf.run(None, {"image": img})[0]
