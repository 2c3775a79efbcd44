"""For the demo: from the first validation chorale with Soprano/Alto/Tenor/Bass, write OUT/melody.mid (the
soprano alone, the prompt of `generate --harmonize`) and OUT/bach.mid with .wav and .png (Bach's own four voices).

    python scripts/chorale_melody.py VAL_DIR OUT_DIR
"""

import sys
from pathlib import Path

import symusic

from midiforge.notes.render import render_pianoroll, render_wav

VOICES = ("Soprano", "Alto", "Tenor", "Bass")


def main(val: str, out: str) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(val).glob("*.mid")):
        score = symusic.Score(str(f))
        by = {t.name: t for t in score.tracks if t.note_num()}
        if all(v in by for v in VOICES):
            break
    else:
        sys.exit(f"no chorale with {', '.join(VOICES)} in {val}")
    score.tracks = [by[v].copy() for v in VOICES]
    bach = out_dir / "bach.mid"
    score.dump_midi(str(bach))
    render_wav(score, bach.with_suffix(".wav"))
    render_pianoroll(score, bach.with_suffix(".png"), title=f"Bach: {f.stem}")
    score.tracks = score.tracks[:1]
    score.dump_midi(str(out_dir / "melody.mid"))
    print(f"{f.name}: melody {out_dir / 'melody.mid'}, Bach's harmonisation {bach} (+ .wav, .png)")


if __name__ == "__main__":
    main(*sys.argv[1:3])
