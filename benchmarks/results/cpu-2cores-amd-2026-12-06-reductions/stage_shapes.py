# forward + backward ms of one training bn_act_stage (ReLU) at resnet50's BN shapes, batch 8, channels_last fp32
import json, statistics, sys, time, torch
import resnet_fused
torch.manual_seed(0)
op = torch.ops.resnet_fused.bn_act_stage.default
shapes = [(64,112), (64,56), (256,56), (128,56), (128,28), (512,28), (256,28), (256,14), (1024,14), (512,14), (512,7), (2048,7)]
out = {"which": resnet_fused.__file__}
for c, hw in shapes:
    x = torch.randn(8, c, hw, hw).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(c, requires_grad=True); b = torch.randn(c, requires_grad=True)
    rm, rv = torch.zeros(c), torch.ones(c); g = torch.randn_like(x)
    def fwd(): return op(x, w, b, rm, rv, None, True, 0.1, None, 1e-5, "relu", 0.0, None)
    def step():
        fwd().backward(g)
    for _ in range(3): step()
    tf, ts = [], []
    for _ in range(15):
        t = time.perf_counter(); y = fwd(); t1 = time.perf_counter(); y.backward(g); t2 = time.perf_counter()
        tf.append((t1 - t) * 1e3); ts.append((t2 - t1) * 1e3)
    out[f"{c}x{hw}"] = (round(statistics.median(tf), 3), round(statistics.median(ts), 3))
print(json.dumps(out))
