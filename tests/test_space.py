"""WidthSpace: which widths each group may take (alignment to the CPU's NCHWc block, minimum ratio)."""

from onnxconet.graph.groups import ChannelGraph
from onnxconet.space import WidthSpace
from tests.onnx_builders import GraphBuilder, gid


def chain(widths: list[int]) -> tuple[ChannelGraph, list[int]]:
    """conv0 -> conv1 -> ... with the given output widths; the last conv is the (frozen) output."""
    b = GraphBuilder()
    h, cin = b.x, 3
    for i, c in enumerate(widths):
        h = b.relu(b.conv(h, f"conv{i}", cin, c, k=1))
        cin = c
    y = b.conv(h, "head", cin, 2, k=1)
    cg = ChannelGraph(b.build([y]))
    return cg, [gid(cg, f"conv{i}.weight") for i in range(len(widths))]


def test_narrow_groups_that_are_multiples_of_the_block_stay_aligned():
    cg, ids = chain([16, 24, 8, 12, 40, 96, 100])
    space = WidthSpace(cg, min_ratio=0.125, align=8)
    opts = {
        c: space.groups[i].options()
        for c, i in zip([16, 24, 8, 12, 40, 96, 100], ids, strict=True)
        if i in space.groups
    }
    assert opts[16] == [8, 16]  # never 2..15: an unaligned narrow group knocks its consumer off NCHWc
    assert opts[24] == [8, 16, 24]
    assert 8 not in opts  # a one-block group cannot shrink and stay aligned: it is not searched
    assert opts[12] == list(range(2, 13))  # not a multiple and too narrow to align: channel steps
    assert opts[40] == [8, 16, 24, 32, 40]
    assert opts[96] == list(range(16, 97, 8))
    # 100 - lo is no multiple of 8: channel steps above the aligned lo
    assert opts[100] == list(range(16, 101))


def test_align_one_keeps_every_width():
    cg, ids = chain([16, 24])
    space = WidthSpace(cg, min_ratio=0.25, align=1)
    assert space.groups[ids[0]].options() == list(range(4, 17))
    assert space.groups[ids[1]].options() == list(range(6, 25))
