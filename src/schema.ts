// The value types a config file is written in, shared by src/config.ts and every sink's own
// schema: what people write in YAML and what ${VAR} produces (a port from the environment is
// the string "8066").
import { z } from 'zod';
import { compileTemplate } from './template.js';

const UNITS_MS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };
/** `500ms`, `5s`, `1h`, or a number of milliseconds. */
export const duration = z.union([z.number().int().nonnegative(), z.string()]).transform((v, ctx) => {
  if (typeof v === 'number') return v;
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$/.exec(v);
  if (!m) {
    ctx.addIssue({ code: 'custom', message: `"${v}" is not a duration (e.g. 500ms, 5s, 1h)` });
    return z.NEVER;
  }
  return Math.round(Number(m[1]) * (UNITS_MS[m[2] ?? 'ms'] as number));
});

const UNITS_BYTES: Record<string, number> = { b: 1, kb: 1024, kib: 1024, mb: 1024 ** 2, mib: 1024 ** 2 };
/** `512kb`, `1mb`, or a number of bytes. */
export const size = z.union([z.number().int().positive(), z.string()]).transform((v, ctx) => {
  if (typeof v === 'number') return v;
  const m = /^\s*(\d+)\s*([a-z]*)\s*$/i.exec(v);
  const unit = UNITS_BYTES[(m?.[2] || 'b').toLowerCase()];
  if (!m || !unit) {
    ctx.addIssue({ code: 'custom', message: `"${v}" is not a size (e.g. 1mb, 512kb, 1048576)` });
    return z.NEVER;
  }
  return Number(m[1]) * unit;
});

export const numeric = (v: unknown) => (typeof v === 'string' && /^\s*-?\d+\s*$/.test(v) ? Number(v) : v);
export const boolish = (v: unknown) => (v === 'true' ? true : v === 'false' ? false : v);
export const int = (min: number, max: number) => z.preprocess(numeric, z.number().int().min(min).max(max));
export const flag = z.preprocess(boolish, z.boolean());

export const url = (protocols: string[]) =>
  z.string().refine(
    (v) => {
      try {
        return protocols.includes(new URL(v).protocol.replace(/:$/, ''));
      } catch {
        return false;
      }
    },
    { message: `must be a URL with scheme ${protocols.join(', ')}` },
  );

export const template = (escape?: (s: string) => string) =>
  z.string().superRefine((v, ctx) => {
    try {
      compileTemplate(v, escape);
    } catch (err) {
      ctx.addIssue({ code: 'custom', message: (err as Error).message });
    }
  });

export const oneOrMany = z.union([z.string(), z.array(z.string()).min(1)]).transform((v) => (Array.isArray(v) ? v : [v]));


/** Per-sink overrides of the `delivery` defaults; every sink's schema has them. */
export const sinkDelivery = {
  deadline: duration.optional(),
  ttl: duration.optional(),
  concurrency: int(1, 100_000).optional(),
  queue: int(0, 1_000_000).optional(),
  maxAttempts: int(1, 1_000_000).optional(),
};

/**
 * A sink type's config schema: `type: <type>`, the sink's own keys and the delivery overrides,
 * strict (an unknown key stops start-up with its path named).
 */
export function sinkSchema<T extends string, S extends z.ZodRawShape>(type: T, shape: S) {
  return z.strictObject({ type: z.literal(type), ...shape, ...sinkDelivery });
}

/** What every sink's config has, whatever its type. */
export type SinkConfigBase = { type: string } & { [K in keyof typeof sinkDelivery]?: number };
