"""StreamDiffusion-style image expert (Kodaira et al. 2023), on diffusers.

The file names are the pipeline:

- ``components.py``: load UNet, VAE, CLIP text encoder/tokenizer and an LCM scheduler from a local
  diffusers-format directory; encode prompts and images, decode latents.
- ``schedule.py``: the n denoising steps a ``t_index_list`` selects from a 50-step LCM schedule,
  and the consistency-model update.
- ``stream.py``: Stream Batch (n-1 partially denoised latents in flight, one UNet call per step
  over every slot) and the guidance variants (none, residual CFG self/initialize, full CFG).
- ``similarity.py``: the stochastic similarity filter.
- ``queues.py``: bounded drop-oldest queues between frame arrival and the model.
- ``images.py``: PNG/JPEG/raw RGB bytes <-> pixel arrays, with the checks that answer INVALID_ARGUMENT.
- ``session.py``: one client stream (queues + filter + Stream Batch + energy per frame).
- ``loop.py``: the thread that owns the model and serves every session and text-to-image job.
- ``worker.py``: the actor body (``runtime/cluster.py`` makes it a Ray actor).
"""
