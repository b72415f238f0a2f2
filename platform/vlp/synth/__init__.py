"""The synthetic world of the demo: shards of moving shapes (``shards``), the demo tower pretrained on its stills
(``tower``), the end-to-end demo (``demo``) and its report (``report``). May import anything in vlp; nothing in the
library proper imports it, except the presets that build the demo tower and the demo tokenizer's corpus."""
