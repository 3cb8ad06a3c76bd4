"""The equivalence matrix's training runs (tests/test_equivalence_matrix.py): one small
token-weighted training run per (engine, cell), each rank recording what a user would see.

An engine is how the gradient becomes data-parallel: "local" (one process), "group" (the
accumulator all-reduces over the default group), "ddp" (DistributedDataParallel) and "fsdp2"
(``fully_shard`` on every layer and the root). A cell is what happens to the run: nothing,
checkpoint-and-resume at a micro-batch, an overflowing window, an exception inside a
micro-batch, parameters that get no gradient. Every cell's run is described by a ``Plan`` that
the large-batch reference (float64, one process, all ranks' rows, one optimizer step per
window) replays exactly.

Run as a script, it is one rank of a gloo world (rendezvous through a FileStore, collective
timeout 30 s): ``python _matrix_worker.py RANK WORLD RDZV OUT_DIR ENGINE,ENGINE``.
"""

import io
import sys
import traceback
from dataclasses import dataclass, field

import torch
from torch import nn

from _multiproc import run_worker

K = 3
WINDOWS = 4  # the last one is forced short (2 micro-batches on every rank)
IN, HID, OUT = 5, 7, 3  # 35-element weights: uneven FSDP2 shards on 2 ranks
MAX_NORM = 0.5
LR, EPS, WD = 1e-2, 1e-6, 0.1


class Net(nn.Module):
    """An MLP with an auxiliary head used only where the plan says (an unused branch)."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.aux = nn.Linear(IN, HID), nn.Linear(HID, OUT), nn.Linear(HID, OUT)

    def forward(self, x, use_aux=True):
        h = torch.tanh(self.l1(x))
        out = self.l2(h)
        return out + self.aux(h) if use_aux else out


def make_net(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    net = Net()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return net.to(dtype)


def make_opt(params):
    return torch.optim.AdamW(params, lr=LR, eps=EPS, weight_decay=WD)


@dataclass
class Plan:
    """What a cell's run does. ``micro[w]``: the micro-batches of window w (alike on every rank);
    ``aux[w][rank]``: whether that rank's forward uses the auxiliary head in window w."""

    name: str
    micro: list = field(default_factory=lambda: [K] * (WINDOWS - 1) + [2])
    aux: "list | None" = None  # None: always used
    resume_at: "tuple | None" = None  # (window, micro-batches done): save, rebuild, load there
    resumes: int = 1  # how many save/load cycles at that point
    overflow_at: "tuple | None" = None  # (window, micro): an inf in the last rank's input
    raise_after_backward: "tuple | None" = None  # (window, micro): the micro-batch raises after acc.backward
    raise_before_backward: "tuple | None" = None  # (window, micro): raises in the forward; the loop retries it
    scaler: bool = False

    def uses_aux(self, w, rank):
        return True if self.aux is None else self.aux[w][rank]

    def skipped(self):
        return {self.overflow_at[0]} if self.overflow_at else set()


def plans():
    out = [Plan("plain")]
    out += [Plan(f"resume_w1_m{m}", resume_at=(1, m)) for m in range(K)]
    out.append(Plan("resume_twice_w1_m1", resume_at=(1, 1), resumes=2))
    out.append(Plan("resume_w3_m1", resume_at=(3, 1)))  # inside the forced short window
    out.append(Plan("overflow", overflow_at=(1, 1), scaler=True))
    # The micro-batch raises after its backward, the loop closes the window short (item 9's pattern).
    out.append(Plan("raise_after_backward", micro=[K, 2, K, 2], raise_after_backward=(1, 1)))
    out.append(Plan("raise_before_backward", raise_before_backward=(1, 1)))
    out.append(Plan("unused", aux=[[True, True], [False, False], [False, False], [True, True]]))
    out.append(Plan("unused_one_rank", aux=[[True, True], [True, False], [False, True], [False, False]]))
    return {p.name: p for p in out}


PLANS = plans()


def rows(w, rank, k):
    """The rows (items) of rank's micro-batch k of window w: 1 to 4, uneven everywhere."""
    return 1 + (7 * w + 3 * rank + 5 * k) % 4


def micro_data(w, rank, k):
    g = torch.Generator().manual_seed(10_000 * w + 100 * rank + k)
    n = rows(w, rank, k)
    return torch.randn(n, IN, generator=g, dtype=torch.float64), torch.randn(n, OUT, generator=g, dtype=torch.float64)


def token_loss(model, x, y, use_aux, dtype=torch.float32):
    """Sum over rows of each row's mean squared error."""
    out = model(x.to(dtype), use_aux).double()
    return (out - y).pow(2).mean(-1).sum()


# ---------------------------------------------------------------- the large-batch reference

def reference(plan: Plan, world: int):
    """float64, one process: per window the token mean over all ranks' rows, one AdamW step.
    Returns (final parameters, per-window norms, per-window losses, AdamW state per parameter)."""
    net = make_net(torch.float64)
    opt = make_opt(net.parameters())
    norms, losses = [], []
    for w, n_micro in enumerate(plan.micro):
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64)
        items = 0
        for rank in range(world):
            for k in range(n_micro):
                x, y = micro_data(w, rank, k)
                total = total + token_loss(net, x, y, plan.uses_aux(w, rank), torch.float64)
                items += len(x)
        if w in plan.skipped():
            norms.append(None)
            losses.append(None)
            continue
        (total / items).backward()
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads]))))
        losses.append(float(total.detach() / items))
        torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.grad is not None], MAX_NORM)
        opt.step()
    state = [_adam_state(opt, p) for p in net.parameters()]
    return [p.detach().clone() for p in net.parameters()], norms, losses, state


def _adam_state(opt, p, full=lambda t: t):
    s = opt.state.get(p)
    if not s:
        return None
    return {"step": float(s["step"]), "exp_avg": full(s["exp_avg"]).double().clone(),
            "exp_avg_sq": full(s["exp_avg_sq"]).double().clone()}


# ---------------------------------------------------------------- one engine's run

class Engine:
    """Builds the model, optimizer and accumulator for one engine; reads full tensors back."""

    def __init__(self, name, rank, world):
        self.name, self.rank, self.world = name, rank, world
        self.mesh = None
        if name == "fsdp2":  # one mesh for every model: a new one per fully_shard costs a group each
            from torch.distributed.device_mesh import init_device_mesh

            self.mesh = init_device_mesh("cpu", (world,))

    def build(self, plan: Plan):
        from fusedaccum import GradAccumulator, LossScaler

        net = make_net()
        model = net
        if self.name == "ddp":
            model = nn.parallel.DistributedDataParallel(net, find_unused_parameters=plan.aux is not None)
        elif self.name == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            for layer in (net.l1, net.l2, net.aux):
                fully_shard(layer, mesh=self.mesh)
            fully_shard(net, mesh=self.mesh)
        scaler = LossScaler(init_scale=2.0**8) if plan.scaler else None
        acc = GradAccumulator(model, K, max_norm=MAX_NORM, scaler=scaler)
        return net, model, make_opt(net.parameters()), acc

    def full(self, t):
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    def params(self, net):
        return [self.full(p.detach()).clone() for p in net.parameters()]

    def state(self, net, opt):
        return [_adam_state(opt, p, self.full) for p in net.parameters()]


def _save(net, opt, acc):
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict(), "acc": acc.state_dict()}, buf)
    return buf.getvalue()


def _load(engine, plan, blob, old_acc):
    old_acc.release()
    net, model, opt, acc = engine.build(plan)
    ckpt = torch.load(io.BytesIO(blob), weights_only=False)
    net.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    acc.load_state_dict(ckpt["acc"])
    return net, model, opt, acc


class Injected(RuntimeError):
    pass


def run(engine: Engine, plan: Plan):
    """Train plan's windows; returns what the test compares with the reference."""
    rank = engine.rank
    net, model, opt, acc = engine.build(plan)
    rec = {"norms": [], "losses": [], "found_inf": [], "num_items": []}
    for w, n_micro in enumerate(plan.micro):
        k = 0
        while k < n_micro:
            if plan.resume_at == (w, k):
                for _ in range(plan.resumes):
                    net, model, opt, acc = _load(engine, plan, _save(net, opt, acc), acc)
            x, y = micro_data(w, rank, k)
            if plan.overflow_at == (w, k) and rank == engine.world - 1:
                x = x.clone()
                x[0, 0] = float("inf")
            try:
                with acc.accumulate(model):
                    if plan.raise_before_backward == (w, k):
                        plan = _once(plan, "raise_before_backward")
                        raise Injected("in the forward")
                    acc.backward(token_loss(model, x, y, plan.uses_aux(w, rank)), num_items=len(x))
                    if plan.raise_after_backward == (w, k):
                        raise Injected("after the backward")
            except Injected as exc:
                if "forward" in str(exc):
                    continue  # the loop retries the micro-batch
            k += 1
        res = acc.step(opt, force=n_micro < K)
        assert res is not None, f"window {w} did not close"
        rec["norms"].append(float(res.total_norm))
        rec["losses"].append(float(res.loss))
        rec["found_inf"].append(float(res.found_inf))
        rec["num_items"].append(float(res.num_items))
    rec["params"] = engine.params(net)
    rec["state"] = engine.state(net, opt)
    acc.release()
    return rec


def _once(plan, attr):
    from dataclasses import replace

    return replace(plan, **{attr: None})


def cells_for(engine):
    """FSDP2 runs the same modules on every rank (its own all-gathers would mismatch), so a
    head used on one rank only is not an FSDP2 program."""
    return [c for c in PLANS if not (engine == "fsdp2" and c == "unused_one_rank")]


def run_engine(name, rank, world):
    """Every cell on one engine; a failing cell is recorded and, with several ranks, ends the
    engine's runs (the ranks may disagree on collectives from there)."""
    engine = Engine(name, rank, world)
    out = {}
    for cell in cells_for(name):
        print(f"{name} rank {rank}: {cell}", flush=True)  # the log says where a crash happened
        try:
            out[cell] = run(engine, PLANS[cell])
        except Exception:
            out[cell] = {"error": traceback.format_exc()}
            if world > 1:
                break
    return out


def worker(rank, world, rdzv, out_dir, engines):
    # run_engine records each cell's failure itself; anything else escaping is a crash of the rank.
    run_worker(rank, world, rdzv, out_dir, engines, lambda name: run_engine(name, rank, world), 30,
               record_errors=False)


if __name__ == "__main__":
    rank_, world_, rdzv_, out_dir_, engines_ = sys.argv[1:6]
    worker(int(rank_), int(world_), rdzv_, out_dir_, engines_.split(","))
