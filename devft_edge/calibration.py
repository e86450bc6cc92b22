"""The small calibration text the server holds to measure how alike the decoder layers are.

Why it exists: deconfliction-guided layer grouping needs a similarity between layers. The paper's
parameter cosine carries no signal on real checkpoints (on SmolLM2-135M the cosine of two different
layers' raw weights is about 0 for every pair), whereas linear CKA of the layers' output hidden
states (:class:`devft_edge.similarity.LinearCKA`) shows clear contiguous blocks. CKA needs
functional evidence, i.e. activations on some text. Clients' data never leaves them, so the server
runs its own model copy over this text: about 700 words of ordinary, varied English prose (written
for this project, no third-party text; narrative, technical, instructions, a letter, civic news,
science), about 800 tokens with SmolLM2's tokenizer. It is not training data and is never sent to
clients. Drop its first token when collecting outputs (``skip_tokens=1`` of
:func:`~devft_edge.similarity.collect_layer_outputs`): that position is an attention sink.
"""

from __future__ import annotations

__all__ = ["CALIBRATION_TEXT", "calibration_ids"]

CALIBRATION_TEXT: str = """\
The market opened early on Saturday, before the fog had lifted from the river. Farmers backed \
their vans into the square and unfolded long tables, while a baker stacked loaves of dark rye \
beside trays of small sugared buns. By eight o'clock the first customers arrived with cloth bags \
and folded lists, asking about the price of pears and whether the eggs were laid that week.

Most people do not think about how a bridge carries its load. A simple beam bends when a truck \
crosses it: the top surface is squeezed and the bottom is stretched. An arch works differently, \
turning the weight into a push that travels along its curve down to the ground on either side. \
That is why stone arches built two thousand years ago still stand, even though stone is weak when \
it is pulled apart.

To make a good vegetable soup, start by softening chopped onion, carrot and celery in a little \
oil over low heat. Add garlic only at the end of this step, because it burns quickly. Pour in \
stock, a handful of lentils and whatever vegetables are in season, then let the pot simmer for \
about forty minutes. Taste it before serving; a squeeze of lemon often helps more than extra salt.

Dear Maria, thank you for the photographs from your trip. The one of the lighthouse at sunset is \
now on our kitchen wall. We have had a quiet month here. Tom finally repaired the garden fence, \
and the neighbours' cat has decided that our porch is her new home. Please write again when you \
have settled into the new flat, and tell us whether the trains are as crowded as you feared.

In the spring of that year the town council voted to turn the old railway line into a path for \
walkers and cyclists. The debate lasted three evenings. Some residents worried about noise and \
parking, others about the cost of lighting and repairs. In the end the plan passed by a narrow \
margin, and within two summers the path had become the busiest stretch of green space in the \
district.

Why does ice float? Most substances become denser when they freeze, because their molecules pack \
more tightly. Water is unusual: as it cools below four degrees, its molecules begin to arrange \
themselves into an open, hexagonal pattern held together by hydrogen bonds. The solid therefore \
takes up more room than the liquid, and lakes freeze from the top down, which lets fish survive \
the winter in the water beneath.

The interview was scheduled for ten, but the candidate arrived twenty minutes early and sat \
reading in the lobby. When the manager asked her why she wanted the job, she answered that she \
liked solving problems nobody had noticed yet. She described how, at her last company, she had \
found that half of the customer complaints came from a single confusing sentence on an invoice.

A few tips for learning a new language: speak it aloud every day, even if only to yourself; read \
children's books before newspapers; and do not fear mistakes, since each one teaches you \
something a textbook cannot. Listening to the radio while cooking helps too. After a few months, \
you may notice that you have started to dream in the new language, which is a good sign.

Late in the evening the wind changed direction and the rain arrived, heavy and sudden. The \
children ran to close the windows, the dog hid under the table, and somewhere down the street a \
car alarm began to wail. By midnight the storm had passed, leaving the pavements shining under \
the street lamps and the air smelling of wet earth and cut grass.

Numbers can surprise us. If you fold a sheet of paper in half again and again, its thickness \
doubles each time. After ten folds it would be about as thick as a book; after twenty, taller \
than a house; and after forty-two, in principle, it would reach past the moon. Nobody can fold \
paper that many times, of course, but the arithmetic shows how quickly repeated doubling grows.
"""


def calibration_ids(tokenizer: object, max_tokens: int = 512) -> object:
    """Token ids ``[1, <= max_tokens]`` of the calibration text (a torch tensor)."""
    return tokenizer(CALIBRATION_TEXT, return_tensors="pt").input_ids[:, :max_tokens]  # type: ignore[operator]
