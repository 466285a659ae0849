// The shape of the code: no module imports itself back through others (issue 7, item 4).
//
// madge (a maintained dependency-graph tool) reads the imports; this file only decides what
// counts. Two questions, because TypeScript has two kinds of import:
// - a runtime cycle (values imported both ways) is what breaks: a module sees the other
//   half-initialised, depending on which was loaded first. None is allowed.
// - a type-only cycle (`import type` both ways) is erased by tsc and cannot break at run time,
//   but it still ties two layers together. The ones that exist are listed, so a new one fails
//   and removing one makes the list shrink.
// The check first runs on test/fixtures/cycle/, whose deliberate cycles it must find, so that
// it cannot pass by reading nothing.
import { readdirSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, posix, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const FIXTURE = join(ROOT, 'test', 'fixtures', 'cycle');
const TSCONFIG = join(ROOT, 'tsconfig.json');

// madge ships no types; this is the part of its API used here (README "API").
type MadgeResult = {
  obj(): Record<string, string[]>;
  circular(): string[][];
  warnings(): { skipped: string[] };
};
type Madge = (paths: string[], config: Record<string, unknown>) => Promise<MadgeResult>;
const madge = createRequire(import.meta.url)('madge') as Madge;

/**
 * The import graph of `paths` (relative to `baseDir`). `runtime` leaves out `import type`,
 * which tsc erases. The tsconfig makes madge resolve `./x.js` specifiers to `./x.ts`
 * (NodeNext resolution), as tsc does.
 */
function graph(baseDir: string, paths: string[], runtime: boolean): Promise<MadgeResult> {
  const ts = { skipTypeImports: runtime };
  return madge(
    paths.map((p) => join(baseDir, p)),
    { baseDir, fileExtensions: ['ts'], tsConfig: TSCONFIG, detectiveOptions: { ts, tsx: ts } },
  );
}

const sorted = (cycles: string[][]) => cycles.map((c) => [...c].sort()).sort((a, b) => a.join().localeCompare(b.join()));
const show = (cycles: string[][]) => cycles.map((c) => [...c, c[0]].join(' -> ')).join('\n');

/** Every .ts file under `dir`, as a path relative to ROOT with forward slashes. */
function tsFiles(dir: string): string[] {
  return readdirSync(join(ROOT, dir), { recursive: true, withFileTypes: true })
    .filter((e) => e.isFile() && e.name.endsWith('.ts') && !e.name.endsWith('.test.ts'))
    .map((e) => relative(ROOT, join(e.parentPath, e.name)).split('\\').join('/'))
    .sort();
}

describe('the cycle check itself', () => {
  it('finds the runtime cycle in the fixture, and not the type-only one', async () => {
    const res = await graph(FIXTURE, ['.'], true);
    expect(res.obj()['ping.ts']).toEqual(['leaf.ts', 'pong.ts']);
    expect(sorted(res.circular())).toEqual([['ping.ts', 'pong.ts']]);
  });

  it('finds both fixture cycles when type imports count', async () => {
    const res = await graph(FIXTURE, ['.'], false);
    expect(sorted(res.circular())).toEqual([
      ['paint.ts', 'shape.ts'],
      ['ping.ts', 'pong.ts'],
    ]);
  });
});

describe('src/ and sinks/', () => {
  it('madge sees every module and follows every relative import (.js specifiers to .ts files)', async () => {
    const res = await graph(ROOT, ['src', 'sinks'], false);
    const deps = res.obj();
    expect(Object.keys(deps).sort()).toEqual([...tsFiles('src'), ...tsFiles('sinks')].sort());
    expect(res.warnings().skipped).toEqual([]);
    // Read the specifiers independently and demand each as an edge: a resolver that dropped
    // `.js` imports would leave a graph with no edges, and no cycles to find.
    let edges = 0;
    for (const file of Object.keys(deps)) {
      const source = readFileSync(join(ROOT, file), 'utf8');
      for (const [, spec] of source.matchAll(/\bfrom\s+'(\.{1,2}\/[^']+)\.js'/g)) {
        const target = posix.normalize(posix.join(posix.dirname(file), `${spec}.ts`));
        expect(deps[file], `${file} imports ${spec}.js`).toContain(target);
        edges++;
      }
    }
    expect(edges).toBeGreaterThan(50);
    expect(deps['src/relay.ts']).toEqual(expect.arrayContaining(['src/dispatch.ts', 'src/outbox.ts', 'sinks/index.ts']));
  });

  it('have no runtime import cycle', async () => {
    const res = await graph(ROOT, ['src', 'sinks'], true);
    const cycles = res.circular();
    expect(cycles, `import cycles:\n${show(cycles)}`).toEqual([]);
  });

  it('have no type-only import cycle either', async () => {
    const res = await graph(ROOT, ['src', 'sinks'], false);
    const cycles = res.circular();
    expect(cycles, `type-level import cycles:\n${show(cycles)}`).toEqual([]);
  });
});
