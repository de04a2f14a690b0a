"""The exact suite (`make bench SUITE=exact [QUICK=1]`): exact vs naive inversion, in three parts that each
write their own result file, so `SUITE=<part>` reruns one (bench/run.py):
  euler_dpmpp  euler and dpmpp_2m on the analytic mixture (analytic.py) and the random-weight tiny models
               in ComfyUI                                                        -> bench/results/exact.json
  samplers     every invertible ComfyUI sampler on the analytic mixture           -> exact_samplers.json
  trained      the trained tiny models beside the analytic mixture, and why the flow misses
                                                                                 -> exact_trained.json
"""
