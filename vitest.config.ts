import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts', 'src/**/*.test.ts', 'sinks/**/*.test.ts'],
    // Builds dist/ once when it is older than the sources: some tests spawn dist/src/cli.js.
    globalSetup: ['test/global-setup.ts'],
    testTimeout: 30_000,
    hookTimeout: 30_000,
    // Tests spawn brokers and relay processes; two cores do not like many at once.
    fileParallelism: true,
    maxWorkers: 2,
  },
});
