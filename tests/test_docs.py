"""The README's config reference is generated from the schema and must be current."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_config_reference_in_sync():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_config_docs.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_every_config_field_documented():
    from pydantic import BaseModel

    from seqlm import registry
    from seqlm.config import RunConfig

    missing = []

    def walk(model, prefix):
        for name, f in model.model_fields.items():
            if name == "type":
                continue
            if not f.description:
                missing.append(prefix + name)
            ann = f.annotation
            for t in (ann, *getattr(ann, "__args__", ())):
                if isinstance(t, type) and issubclass(t, BaseModel):
                    walk(t, f"{prefix}{name}.")

    walk(RunConfig, "")
    for name, cls in registry.blocks().items():
        walk(cls.Config, f"<{name}>.")
    assert not missing, f"config fields without description: {missing}"
