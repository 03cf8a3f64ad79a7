import time, statistics, numpy as np, torch
from es_service import network, noise
from es_service.data import load_mnist
from workers.evaluator import PopulationEvaluator
d=load_mnist(); table=noise.make_table(0,1<<23)
ev=PopulationEvaluator(table,d.train_images,d.train_labels,"tf-ftz","cpu",fused=True)
rng=np.random.default_rng(0)
offs=np.repeat(rng.integers(0,noise.max_offset(1<<23)+1,64),2).astype(np.int64)
signs=np.tile(np.array([1,-1],np.float32),64)
imgs=rng.choice(60000,256,replace=False).astype(np.int64)
theta=network.init_theta(0)
def run(tile, shared):
    for s in range(0,128,tile):
        ev.evaluate(theta,offs[s:s+tile],signs[s:s+tile],0.02,imgs,shared_first_layer=shared)
cases={(t,sh):(lambda t=t,sh=sh: run(t,sh)) for t in (8,128) for sh in (False,True)}
for f in cases.values(): f()
ts={k:[] for k in cases}
for r in range(5):
    for k,f in cases.items():
        t0=time.perf_counter(); f(); ts[k].append(time.perf_counter()-t0)
for k in cases: print(k, round(statistics.median(ts[k])*1e3,1))
