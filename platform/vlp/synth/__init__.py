"""The synthetic world of the demo: shards of moving shapes with optional soundtracks (``shards``), the demo's
towers pretrained on it (``tower``: tiny-clip-synth on its stills; ``sound_tower``: tiny-ast-synth on tones), the
end-to-end demo (``demo``) and its report (``report``). May import anything in vlp; in the library proper only the
presets that build the demo towers, the demo tokenizer's corpus and ``eval.synthetic`` (the questions it scores)
import it."""
