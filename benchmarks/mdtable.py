"""Render benchmarks/results/kernels-h100.json as the Markdown table (kernels-h100.md)."""
import json
import sys

d = json.load(open(sys.argv[1]))
m = d["meta"]
print(f"# CMPQ decode kernels vs FP16 cuBLAS\n\n{m['device']}, {m['date']}, torch {m['torch']}, triton {m['triton']}, "
      f"copy bandwidth {m['copy_bw_Bps'] / 1e12:.2f} TB/s. {m['method']}. Kernel: {m.get('impl', 'triton')}.\n")
print("| layer (out x in) | bits | tokens | CMPQ us | FP16 us | speedup | floor us | % copy bw |")
print("|---|---|---|---|---|---|---|---|")
for r in d["rows"]:
    print(f"| {r['model']} {r['out']}x{r['inp']} | {r['bits']} | {r['tokens']} | {r['cmpq_us']:.1f} | "
          f"{r['fp16_us']:.1f} | {r['speedup']:.2f} | {r['floor_us']:.1f} | {100 * r['bw_frac']:.0f} |")
