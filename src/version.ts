// What GET /version reports: the package version and, when run from a git checkout, the
// short commit hash (the official proxy answers {"hash","version"} too, contract §1.2).
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = findRoot(dirname(fileURLToPath(import.meta.url)));

function findRoot(dir: string): string {
  for (let d = dir, i = 0; i < 5; i++, d = dirname(d)) {
    try {
      readFileSync(join(d, 'package.json'));
      return d;
    } catch {
      /* keep looking upwards */
    }
  }
  return dir;
}

function gitHash(): string {
  if (process.env.PUSH_RELAY_GIT_HASH) return process.env.PUSH_RELAY_GIT_HASH.slice(0, 7);
  try {
    const head = readFileSync(join(root, '.git', 'HEAD'), 'utf8').trim();
    if (!head.startsWith('ref: ')) return head.slice(0, 7);
    const ref = head.slice(5);
    try {
      return readFileSync(join(root, '.git', ref), 'utf8').trim().slice(0, 7);
    } catch {
      const packed = readFileSync(join(root, '.git', 'packed-refs'), 'utf8');
      const line = packed.split('\n').find((l) => l.endsWith(` ${ref}`));
      return line ? line.slice(0, 7) : 'unknown';
    }
  } catch {
    return 'unknown';
  }
}

export const VERSION: { version: string; hash: string } = {
  version: (JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { version: string }).version,
  hash: gitHash(),
};
