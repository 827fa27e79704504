"""Worker of test_losses.test_nt_xent_distributed_equals_single_process (run under torchrun, gloo, CPU)."""
import sys

import torch
import torch.distributed as dist

import losses

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
q_all = torch.randn(8, 6)
k_all = torch.randn(8, 6)
b = 8 // world
q = q_all[rank * b:(rank + 1) * b].clone().requires_grad_(True)
k = k_all[rank * b:(rank + 1) * b]
loss = losses.nt_xent(q, k, 0.2).mean()
loss.backward()
# what DDP does: average the local losses' gradients over ranks; the full gradient of q_all is their concatenation
grad = q.grad / world
parts = [torch.empty_like(grad) for _ in range(world)]
dist.all_gather(parts, grad)
mean_loss = loss.detach().clone()
dist.all_reduce(mean_loss)
if rank == 0:
    torch.save({"loss": mean_loss / world, "grad": torch.cat(parts)}, sys.argv[1])
dist.destroy_process_group()
