// tessera: one binary, one file per subcommand. Errors become one line on stderr and a non-zero
// exit code: 2 for a wrong command line, 1 for anything else that fails.
#include <cstdio>
#include <exception>
#include <new>

#include "commands.hpp"
#include "mpi.hpp"
#include "tessera/error.hpp"
#include "tessera/text.hpp"
#include "tessera/version.hpp"

int main(int argc, char** argv) {
  // Under mpirun / srun (and built with MPI): MPI_Init now, MPI_Finalize when main returns.
  tessera::cli::MpiSession mpi(&argc, &argv);
  CLI::App app{"Tessera: vision Transformers on the CPU"};
  app.set_version_flag("--version", std::string("tessera ") + tessera::version());
  app.require_subcommand(1);
  // Options of the whole program, accepted before or after the subcommand.
  std::string font;
  app.add_option("--font", font, "TrueType font for text on pictures (default: TESSERA_FONT, else DejaVu Sans)");
  app.fallthrough();
  tessera::cli::Action action;
  tessera::cli::add_classify(app, action);
  tessera::cli::add_infer(app, action);
  tessera::cli::add_info(app, action);
  tessera::cli::add_bench(app, action);
  tessera::cli::add_view(app, action);
  tessera::cli::add_segment(app, action);
  tessera::cli::add_detect(app, action);
  tessera::cli::add_train(app, action);
  tessera::cli::add_data(app, action);
  tessera::cli::add_eval(app, action);
  tessera::cli::add_features(app, action);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "tessera: %s\n", e.what());
    std::fprintf(stderr, "Run with --help for usage.\n");
    return 2;
  }
  try {
    if (!font.empty()) tessera::set_font_path(font);
    return action ? action() : 0;
  } catch (const tessera::Error& e) {
    std::fprintf(stderr, "tessera: error: %s\n", e.what());
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "tessera: error: out of memory\n");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tessera: error: %s\n", e.what());
  }
  std::fflush(stderr);
  tessera::cli::mpi_abort(1);  // one rank failing ends the job rather than leaving the others waiting
  return 1;
}
