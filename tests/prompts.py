"""Small builders for API-format prompts, shared by the integration tests.

A prompt is a dict of node id -> {"class_type", "inputs"}; `Graph` hands out ids and
returns [node_id, output_index] links, so tests read as the graph they build.
"""


class Graph:
    def __init__(self):
        self.prompt = {}

    def node(self, class_type, **inputs):
        node_id = str(len(self.prompt) + 1)
        self.prompt[node_id] = {"class_type": class_type, "inputs": inputs}
        return Node(node_id)


class Node:
    def __init__(self, node_id):
        self.id = node_id

    def __getitem__(self, index):
        return [self.id, index]

    @property
    def out(self):
        return [self.id, 0]


# Conditioning widths for the tiny models (tests/support/tiny_models.py).
SD15 = {"width": 768, "pooled_width": 0}
SD3 = {"width": 4096, "pooled_width": 2048}
FLUX = {"width": 64, "pooled_width": 32}
WAN21 = {"width": 4096, "pooled_width": 0}


def random_conditioning(graph, family, seed=0, batch=1, tokens=8, scale=1.0):
    return graph.node("EITestRandomConditioning", tokens=tokens, seed=seed, batch=batch, scale=scale, **family).out
