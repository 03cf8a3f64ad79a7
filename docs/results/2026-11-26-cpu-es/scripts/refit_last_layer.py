"""Diagnostic (stop 11): keep W1, b1, W2, b2 of a checkpoint's theta, refit W3, b3 by full-batch
logistic regression (L-BFGS) on its last hidden layer over the 60,000 training images, and print the
accuracy before and after, with (tf-ftz) and without (linear) flushing. It tells how far the output
layer sits from its best fit given the features. From the repository root:
    python docs/results/2026-11-26-cpu-es/scripts/refit_last_layer.py RUN/checkpoint.pt
    python docs/results/2026-11-26-cpu-es/scripts/refit_last_layer.py init 0    # theta at initialisation
"""
import sys, torch
from es_service import network, data
torch.manual_seed(0)
m = data.load_mnist()
def prep(im): return im.reshape(len(im), -1).float() / 255
xt, yt = prep(m.test_images), m.test_labels
xtr, ytr = prep(m.train_images), m.train_labels
def load(path):
    if path == "init": return network.init_theta(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    ck = torch.load(path, weights_only=False, map_location='cpu')
    return (ck['theta'] if 'theta' in ck else ck['state']['theta']).float().cpu()
def acc(th, x, y, mode):
    with torch.no_grad():
        return (network.forward(x, network.unflatten(th), mode).argmax(1) == y).float().mean().item()
def feats(th, x, mode):
    w1,b1,w2,b2,w3,b3 = network.unflatten(th)
    ops = network.epilogues(mode)
    with torch.no_grad():
        h1 = ops.hidden1(x @ w1, b1); return ops.hidden2(h1 @ w2, b2)
th = load(sys.argv[1])
print("before: tf-ftz test %.4f train %.4f | linear test %.4f" % (acc(th, xt, yt, "tf-ftz"), acc(th, xtr, ytr, "tf-ftz"), acc(th, xt, yt, "linear")))
for mode in ("tf-ftz", "linear"):
    ftr, fte = feats(th, xtr, mode), feats(th, xt, mode)
    print(mode, "feature scale", ftr.abs().max().item(), "zero frac", (ftr == 0).float().mean().item())
    w3, b3 = network.unflatten(th)[4].clone().requires_grad_(), network.unflatten(th)[5].clone().requires_grad_()
    opt = torch.optim.LBFGS([w3, b3], max_iter=300, history_size=20, line_search_fn="strong_wolfe")
    def closure():
        opt.zero_grad(); loss = torch.nn.functional.cross_entropy(ftr @ w3 + b3, ytr) + 1e-4 * (w3**2).sum(); loss.backward(); return loss
    opt.step(closure)
    new = th.clone(); p = network.unflatten(new); p[4].copy_(w3.detach()); p[5].copy_(b3.detach())
    print(" refit last layer on", mode, "features: tf-ftz test %.4f train %.4f | linear test %.4f  |W3| %.2f -> %.2f" % (
        acc(new, xt, yt, "tf-ftz"), acc(new, xtr, ytr, "tf-ftz"), acc(new, xt, yt, "linear"), network.unflatten(th)[4].norm(), w3.detach().norm()))
for k in (2.0, 3.0):
    new = th.clone(); network.unflatten(new)[4].mul_(k); network.unflatten(new)[5].mul_(k)
    print("W3,b3 x%g: tf-ftz test %.4f train %.4f" % (k, acc(new, xt, yt, "tf-ftz"), acc(new, xtr, ytr, "tf-ftz")))
