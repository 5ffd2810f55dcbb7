"""Former name of the reference engram / pp / cp ops, kept for tests/gpu (which imports it);
new code imports deep_ep_ops.cpu.engram and deep_ep_ops.cpu.pp_cp."""
from deep_ep_ops.cpu.engram import engram_fetch, engram_scatter_add
from deep_ep_ops.cpu.pp_cp import cp_all_gather, cp_reduce_scatter, pp_send_recv

__all__ = ["engram_fetch", "engram_scatter_add", "pp_send_recv", "cp_all_gather",
           "cp_reduce_scatter"]
