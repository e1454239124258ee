"""Train a qpass-compiled tiny GPTQ Llama data-parallel (gloo, CPU) or in one process; save the adapter tensors.

    python tests/ddp_train.py OUT.pt --world 2 [--mode ddp|fsdp2]   # each rank: its half of the global batch
    python tests/ddp_train.py OUT.pt --world 1                      # the whole global batch in one process
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

STEPS, GLOBAL_BATCH, SEQ = 3, 4, 12
# decoder layers, each sharded on its own (the usual FSDP2 recipe). One: its graph recompiles at step 1, when
# qpass's pool used to be rebuilt over FSDP2's unsharded parameters (stale adapters from then on).
LAYERS = 1


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, 256, (GLOBAL_BATCH, SEQ), generator=g)
    return ids, torch.roll(ids, -1, dims=1)


def train(rank, world, out, mode):
    import qpass
    from qpass.testing import tiny_gptq_llama

    torch.set_num_threads(1)
    if world > 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = qpass.prepare(tiny_gptq_llama(num_hidden_layers=LAYERS), qpass.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="gaussian"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if world > 1 and mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model)
    elif world > 1 and mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        wrapped = model
    compiled = torch.compile(wrapped, backend=qpass.backend("aot_eager"))
    opt = torch.optim.SGD(params, lr=0.5)
    per_rank = GLOBAL_BATCH // world
    for step in range(STEPS):
        ids, labels = batch(step)
        ids, labels = ids[rank * per_rank:(rank + 1) * per_rank], labels[rank * per_rank:(rank + 1) * per_rank]
        loss = compiled(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    state = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
             for n, p in model.named_parameters() if "qpass_adapters" in n}
    if rank == 0:
        torch.save({"state": state, "recompiles": qpass.report(model).stats.recompiles}, out)
    if world > 1:
        dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--mode", default="ddp", choices=["ddp", "fsdp2"])
    parser.add_argument("--port", default="29533")
    args = parser.parse_args()
    os.environ["MASTER_PORT"] = args.port
    if args.world == 1:
        train(0, 1, args.out, args.mode)
    else:
        torch.multiprocessing.spawn(train, args=(args.world, args.out, args.mode), nprocs=args.world)


if __name__ == "__main__":
    main()
