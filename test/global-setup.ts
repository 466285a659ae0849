// Tests that spawn `node dist/src/cli.js` need a build that matches the sources. Rebuild once
// per run when any source is newer than dist/src/cli.js (`npm test` has just built: no-op).
import { execFileSync } from 'node:child_process';
import { readdirSync, statSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = resolve(fileURLToPath(new URL('..', import.meta.url)));

function newest(dir: string): number {
  let max = 0;
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, entry.name);
    max = Math.max(max, entry.isDirectory() ? newest(p) : entry.name.endsWith('.ts') ? statSync(p).mtimeMs : 0);
  }
  return max;
}

function mtime(p: string): number {
  try {
    return statSync(p).mtimeMs;
  } catch {
    return 0;
  }
}

export default function setup(): void {
  const built = mtime(join(root, 'dist', 'src', 'cli.js'));
  const sources = Math.max(newest(join(root, 'src')), newest(join(root, 'sinks')), mtime(join(root, 'tsconfig.json')), mtime(join(root, 'package.json')));
  if (built > sources) return;
  const tsc = join(root, 'node_modules', 'typescript', 'bin', 'tsc');
  try {
    execFileSync(process.execPath, [tsc, '-p', 'tsconfig.json'], { cwd: root, stdio: 'pipe', timeout: 120_000 });
  } catch (err) {
    // tsc still emits JavaScript on type errors; `npm test` (build first) is where those fail.
    const out = (err as { stdout?: Buffer }).stdout?.toString() ?? String(err);
    if (mtime(join(root, 'dist', 'src', 'cli.js')) === 0) throw new Error(`build failed, no dist/src/cli.js:\n${out}`);
    console.warn(`tsc reported errors; spawned-relay tests use the emitted JavaScript anyway:\n${out}`);
  }
}
