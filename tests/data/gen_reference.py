#!/usr/bin/python3
"""Reference data for the BatchNorm tests (tests/test_batchnorm.c) and for the
distributed SyncBatchNorm tests.

Run with Debian's python3 (numpy, torch):  /usr/bin/python3 tests/data/gen_reference.py
It rewrites the *.bin files next to it; the output is deterministic (fixed
seeds).  The C tests only read the files, they never need Python.

The references come from PyTorch's own batch_norm in float64 (an independent
implementation of the same formulas), with MegEngine's momentum 0.9 mapped to
torch's 1 - 0.9 = 0.1, eps = 1e-5, running stats starting at mean 0, var 1.
Inputs are float32 drawn from N(2.3, 1) unless said otherwise; every array is
stored as float32 (the rounding, 6e-8 relative, is far inside the tests'
tolerance 5e-6 + 5e-6*|ref|).

File format (little endian), "SBNREF1":
    8 bytes   magic b"SBNREF1\\0"
    uint32    number of arrays
    per array:
      uint32  name length, then the name bytes (ASCII, no terminator)
      uint32  ndim, then ndim uint32 sizes
      float32 values, numel of them, row-major

Files and array names:
  train_3d.bin / train_4d.bin   shapes (3,8,4) / (3,8,16,16), default layer
      x0 x1 x2      training inputs of steps 0..2
      y0 y1 y2      outputs of the training steps
      rm0..rm2      running_mean after each step (8,)
      rv0..rv2      running_var after each step (8,)
      x3 y3         an eval-mode input and its output (running stats of step 2)
  nostats_3d.bin   track_running_stats=False, (3,8,4): x0..x3, y0..y3
      (iterations 0,1 in train mode, 2,3 in eval mode: batch stats always)
  nostats_4d.bin   the same for (3,8,16,16) on the inputs x0..x3 of
      train_4d.bin (to keep the data small): y0..y3 only
  step_2d.bin, step_3d.bin, step_4d.bin, step_5d.bin, bigmean.bin
      one training step of a layer with random weight/bias, shapes (16,8),
      (3,8,4), (4,8,5,3), (2,8,3,4,2) and, for bigmean, (4,8,6,5) with
      per-channel means of magnitude 1e4 and std 1:
      x dy weight bias       inputs (dy ~ N(0,1); weight ~ U(0.5,1.5), bias ~ N(0,1))
      y dx dweight dbias     output and gradients (dweight/dbias of the batch)
      rm rv                  running stats after the step
  eval_4d.bin      backward in eval mode (running statistics), (4,8,5,3):
      x dy weight bias rm rv (the running stats used) y dx dweight dbias
  freeze.bin       MegEngine's test_frozen_bn: d (6,3,2,2) ~ U[0,1),
      running_mean 1, running_var 4: d and y = (d - 1) / sqrt(4 + eps)
  dist_3x8x4x16.bin  the global batch of the distributed acceptance test,
      (3,8,4,16), random weight/bias, one training step of the full batch:
      x dy weight bias y dx dweight dbias rm rv (same names as step_*.bin).
      A rank holding a slice of x (along N or W) must produce the same slice
      of y and dx, running stats equal to rm/rv (global n), and the
      per-rank dweight/dbias must add up to dweight/dbias.

Channels-last and fused-ReLU layers (tests/test_bn_layout.c), written after
the files above from their own generator (seed 20250301), so the files above
stay byte-identical.  A "channels-last" array has the channels on its LAST
axis, (N, ..., C); its reference is PyTorch's batch_norm on the tensor moved
to (N, C, ...) (torch.movedim) and moved back, and the fused ReLU is
torch.relu of that, differentiated by autograd, all in float64.
  layout_<case>.bin   one training step then one eval step of a layer with
      random weight ~ U(0.5,1.5), bias ~ N(0,1), running stats 0/1 at first:
      x dy weight bias         training inputs
      y dx dweight dbias       training output and gradients
      rm rv                    running stats after the step (float32)
      ex edy                   eval inputs
      ey edx edweight edbias   eval output and gradients, normalizing with
                               rm rv exactly as stored (float32 values)
    cases (shape in the input's own layout):
      cl_2d (17,8)  cl_3d (3,5,8)  cl_4d (4,5,3,8)  cl_5d (2,3,4,2,8)
      cl_odd (3,5,3,7)  cl_bigmean (4,6,5,8), per-channel |mean| ~ 1e4, std 1
      relu_nchw_3d (3,8,5)  relu_nchw_4d (4,8,5,3)  relu_nchw_odd (3,7,5,3)
      relu_cl_2d (17,8)  relu_cl_4d (4,5,3,8)  relu_cl_5d (2,3,4,2,8)
      relu_cl_odd (3,5,3,7)  relu_cl_bigmean (4,6,5,8)
    For the ReLU cases every pre-activation value is at least 2e-5 away from
    0 (inputs are redrawn otherwise), so float32 rounding cannot flip the
    mask.  The eval arrays also serve the freeze tests (a frozen layer
    computes the eval step in training mode).
  dist_cl_relu.bin   the distributed case: channels-last (3,4,16,8) with
      the fused ReLU, one training step of the full batch, arrays as
      layout_*.bin (x dy weight bias y dx dweight dbias rm rv ...).
"""
import os
import struct

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
EPS = 1e-5
MOMENTUM = 0.9  # MegEngine's: weights the old value
TORCH_MOMENTUM = 1.0 - MOMENTUM


def write(name, arrays):
    path = os.path.join(HERE, name)
    with open(path, "wb") as f:
        f.write(b"SBNREF1\0")
        f.write(struct.pack("<I", len(arrays)))
        for key, a in arrays:
            a = np.ascontiguousarray(np.asarray(a, dtype="<f4"))
            k = key.encode("ascii")
            f.write(struct.pack("<I", len(k)))
            f.write(k)
            f.write(struct.pack("<I", a.ndim))
            f.write(struct.pack("<%dI" % a.ndim, *a.shape))
            f.write(a.tobytes())
    print("wrote %s (%d bytes)" % (name, os.path.getsize(path)))


def t64(a, grad=False):
    return torch.tensor(np.asarray(a, dtype=np.float64), dtype=torch.float64, requires_grad=grad)


def normal(rng, shape, loc=2.3):
    return rng.normal(loc=loc, size=shape).astype(np.float32)


def train_case(rng, shape, track=True, steps=3, evals=1, xs=None):
    """Steps of a default layer (weight 1, bias 0); returns the arrays."""
    C = shape[1]
    rm = torch.zeros(C, dtype=torch.float64)
    rv = torch.ones(C, dtype=torch.float64)
    out = []
    for i in range(steps + evals):
        x = xs[i] if xs is not None else normal(rng, shape)
        training = i < steps
        if track:
            y = F.batch_norm(t64(x), rm, rv, None, None, training=training,
                             momentum=TORCH_MOMENTUM, eps=EPS)
        else:
            y = F.batch_norm(t64(x), None, None, None, None, training=True, eps=EPS)
        if xs is None:
            out.append(("x%d" % i, x))
        out.append(("y%d" % i, y.numpy()))
        if track and training:
            out.append(("rm%d" % i, rm.numpy().copy()))
            out.append(("rv%d" % i, rv.numpy().copy()))
    return out


def step_case(rng, shape, x=None, training=True, rm=None, rv=None):
    """One step of a layer with random weight/bias, forward and backward."""
    C = shape[1]
    if x is None:
        x = normal(rng, shape)
    dy = rng.normal(size=shape).astype(np.float32)
    w = rng.uniform(0.5, 1.5, size=C).astype(np.float32)
    b = rng.normal(size=C).astype(np.float32)
    rm = torch.zeros(C, dtype=torch.float64) if rm is None else t64(rm)
    rv = torch.ones(C, dtype=torch.float64) if rv is None else t64(rv)
    rm_in, rv_in = rm.numpy().copy(), rv.numpy().copy()
    xt, wt, bt = t64(x, True), t64(w, True), t64(b, True)
    y = F.batch_norm(xt, rm, rv, wt, bt, training=training, momentum=TORCH_MOMENTUM, eps=EPS)
    y.backward(t64(dy))
    arrays = [("x", x), ("dy", dy), ("weight", w), ("bias", b)]
    if not training:
        arrays += [("rm", rm_in), ("rv", rv_in)]
    arrays += [("y", y.detach().numpy()), ("dx", xt.grad.numpy()),
               ("dweight", wt.grad.numpy()), ("dbias", bt.grad.numpy())]
    if training:
        arrays += [("rm", rm.numpy()), ("rv", rv.numpy())]
    return arrays


def main():
    rng = np.random.default_rng(20240611)
    write("train_3d.bin", train_case(rng, (3, 8, 4)))
    t4 = train_case(rng, (3, 8, 16, 16))
    write("train_4d.bin", t4)
    write("nostats_3d.bin", train_case(rng, (3, 8, 4), track=False, steps=2, evals=2))
    xs4 = [dict(t4)["x%d" % i] for i in range(4)]
    write("nostats_4d.bin", train_case(rng, (3, 8, 16, 16), track=False,
                                       steps=2, evals=2, xs=xs4))
    write("step_2d.bin", step_case(rng, (16, 8)))
    write("step_3d.bin", step_case(rng, (3, 8, 4)))
    write("step_4d.bin", step_case(rng, (4, 8, 5, 3)))
    write("step_5d.bin", step_case(rng, (2, 8, 3, 4, 2)))
    big_mean = rng.choice([-1.0, 1.0], size=8) * rng.uniform(0.9e4, 1.1e4, size=8)
    xb = (rng.normal(size=(4, 8, 6, 5)) + big_mean[None, :, None, None]).astype(np.float32)
    write("bigmean.bin", step_case(rng, (4, 8, 6, 5), x=xb))
    rm = rng.normal(loc=2.3, size=8).astype(np.float32)
    rv = rng.uniform(0.5, 2.0, size=8).astype(np.float32)
    write("eval_4d.bin", step_case(rng, (4, 8, 5, 3), training=False, rm=rm, rv=rv))
    d = rng.random((6, 3, 2, 2)).astype(np.float32)
    write("freeze.bin", [("d", d), ("y", (d.astype(np.float64) - 1.0) / np.sqrt(4.0 + EPS))])
    write("dist_3x8x4x16.bin", step_case(rng, (3, 8, 4, 16)))
    layout_files()


RELU_MARGIN = 2e-5


def layout_case(rng, shape, cl, relu, big_mean=False):
    """A training step then an eval step; shape in the input's layout."""
    C = shape[-1] if cl else shape[1]
    to_nchw = (lambda t: t.movedim(-1, 1)) if cl else (lambda t: t)
    from_nchw = (lambda t: t.movedim(1, -1)) if cl else (lambda t: t)

    def draw():
        if big_mean:
            mean = rng.choice([-1.0, 1.0], size=C) * rng.uniform(0.9e4, 1.1e4, size=C)
            return (rng.normal(size=shape) + mean).astype(np.float32)  # C is last
        return normal(rng, shape)

    def run(x, dy, w, b, rm, rv, training):
        xt, wt, bt = t64(x, True), t64(w, True), t64(b, True)
        pre = F.batch_norm(to_nchw(xt), rm, rv, wt, bt, training=training,
                           momentum=TORCH_MOMENTUM, eps=EPS)
        out = from_nchw(torch.relu(pre) if relu else pre)
        out.backward(t64(dy))
        margin = pre.detach().abs().min().item() if pre.numel() else 1.0
        return (out.detach().numpy(), xt.grad.numpy(), wt.grad.numpy(), bt.grad.numpy(),
                margin)

    while True:
        x, ex = draw(), draw()
        dy = rng.normal(size=shape).astype(np.float32)
        edy = rng.normal(size=shape).astype(np.float32)
        w = rng.uniform(0.5, 1.5, size=C).astype(np.float32)
        b = rng.normal(size=C).astype(np.float32)
        rm = torch.zeros(C, dtype=torch.float64)
        rv = torch.ones(C, dtype=torch.float64)
        y, dx, dw, db, m1 = run(x, dy, w, b, rm, rv, True)
        rm32 = rm.numpy().astype(np.float32)
        rv32 = rv.numpy().astype(np.float32)
        ey, edx, edw, edb, m2 = run(ex, edy, w, b, t64(rm32), t64(rv32), False)
        if not relu or min(m1, m2) >= RELU_MARGIN:
            break
    if relu:
        assert (y == 0).any() and (y > 0).any(), "the ReLU should cut some values"
    return [("x", x), ("dy", dy), ("weight", w), ("bias", b),
            ("y", y), ("dx", dx), ("dweight", dw), ("dbias", db), ("rm", rm32), ("rv", rv32),
            ("ex", ex), ("edy", edy), ("ey", ey), ("edx", edx), ("edweight", edw),
            ("edbias", edb)]


def layout_files():
    rng = np.random.default_rng(20250301)
    cases = [
        ("cl_2d", (17, 8), True, False, False),
        ("cl_3d", (3, 5, 8), True, False, False),
        ("cl_4d", (4, 5, 3, 8), True, False, False),
        ("cl_5d", (2, 3, 4, 2, 8), True, False, False),
        ("cl_odd", (3, 5, 3, 7), True, False, False),
        ("cl_bigmean", (4, 6, 5, 8), True, False, True),
        ("relu_nchw_3d", (3, 8, 5), False, True, False),
        ("relu_nchw_4d", (4, 8, 5, 3), False, True, False),
        ("relu_nchw_odd", (3, 7, 5, 3), False, True, False),
        ("relu_cl_2d", (17, 8), True, True, False),
        ("relu_cl_4d", (4, 5, 3, 8), True, True, False),
        ("relu_cl_5d", (2, 3, 4, 2, 8), True, True, False),
        ("relu_cl_odd", (3, 5, 3, 7), True, True, False),
        ("relu_cl_bigmean", (4, 6, 5, 8), True, True, True),
    ]
    for name, shape, cl, relu, big in cases:
        write("layout_%s.bin" % name, layout_case(rng, shape, cl, relu, big))
    write("dist_cl_relu.bin", layout_case(rng, (3, 4, 16, 8), True, True))


if __name__ == "__main__":
    main()
