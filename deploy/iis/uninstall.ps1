<#
.SYNOPSIS
    Removes VezaProvisioner from IIS: the application, its settings, the application pool when
    install.ps1 created it, the FastCGI registration and (with -RemoveFiles) the installed files.

.DESCRIPTION
    Safe to re-run: whatever is already gone is skipped. -WhatIf shows what would be removed.
    The application pool is removed only when install.ps1 created it (it names that pool in
    config\created-app-pool.txt): a pool the admin built stays, with its identity.
    The configuration and data folders (journal, logs) are kept unless -RemoveData is given.
    It stops at the first failed step with a sentence saying what to do.

    -FromMsi: run by VezaProvisioner.msi as LocalSystem before it deletes its files. Every line
    also goes to <InstallRoot>\logs\uninstall-msi.log (Windows Installer keeps no output of a
    custom action), and the files the MSI does not track go too: the venv, the app folder, the
    written configuration and the install transcript. The data folder (journal, audit, service
    logs) stays unless -RemoveData is given.

    -Rollback: run by VezaProvisioner.msi's rollback action when an installation, upgrade or
    repair fails after install.ps1 started. It removes exactly what that run of install.ps1
    created, newest first, as listed in <InstallRoot>\logs\created-this-run.txt (the
    application and its settings, the pool, the FastCGI registration, the configuration file,
    the venv and folders), and nothing that was there before: an upgrade's failure leaves the
    old application, pool and data alone. The logs folder stays, with the failed run's
    transcript and this one's (rollback-msi.log). install.ps1 deletes the list when it
    succeeds, and -Rollback when it is done, so a list is never replayed: a run that fails
    before it starts its list (PowerShell refusing a parameter) leaves no list, and nothing
    is removed.

.EXAMPLE
    .\uninstall.ps1 -WhatIf
    .\uninstall.ps1 -RemoveFiles
#>
[CmdletBinding(SupportsShouldProcess = $true)]
param(
    [string] $InstallRoot = 'C:\VezaProvisioner',
    [string] $SiteName = 'Default Web Site',
    [ValidatePattern('^[A-Za-z0-9._~-]+$')]
    [string] $AppName = 'VezaProvisioner',
    # Also delete the program files (venv and app folders).
    [switch] $RemoveFiles,
    # Also delete the configuration and the data folder (journal and logs).
    [switch] $RemoveData,
    # Run by VezaProvisioner.msi: a transcript file, and the venv, app folder and configuration go
    # too (the MSI removes only the files it installed).
    [switch] $FromMsi,
    # Run by the MSI's rollback action: remove only what the failed install.ps1 run created.
    [switch] $Rollback
)

Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'

$AppHost = 'MACHINE/WEBROOT/APPHOST'
$Location = "$SiteName/$AppName"
$VenvDir = Join-Path $InstallRoot 'venv'
$VenvPython = Join-Path $VenvDir 'Scripts\python.exe'
$WfastcgiPy = Join-Path $VenvDir 'Lib\site-packages\wfastcgi.py'
$ConfigDir = Join-Path $InstallRoot 'config'
$LogsDir = Join-Path $InstallRoot 'logs'
# Written by install.ps1 under the MSI: what its run created, one "kind<TAB>what" per line.
$CreatedList = Join-Path $LogsDir 'created-this-run.txt'
$AuthSections = @(
    'system.webServer/security/authentication/anonymousAuthentication',
    'system.webServer/security/authentication/windowsAuthentication',
    'system.webServer/security/authentication/basicAuthentication',
    'system.webServer/security/access'
)
# Written by install.ps1 when it created the pool; names the only pool this script may remove.
$PoolMarker = Join-Path $ConfigDir 'created-app-pool.txt'
$Utf8 = New-Object System.Text.UTF8Encoding($false)
$LogFile = ''
# The pool the first step stopped (its python.exe processes lock the venv's files).
$StoppedPool = ''

function Write-Line {
    # The script's output: the console and, under the MSI, the transcript file.
    param([string] $Text = '')
    Write-Host $Text
    if ($script:LogFile) {
        [System.IO.File]::AppendAllText($script:LogFile, $Text + [Environment]::NewLine, $Utf8)
    }
}

function Invoke-Step {
    # Runs one step; a failure stops the script with what failed and what to do about it.
    param([string] $Name, [string] $Fix, [scriptblock] $Action)
    Write-Line "==> $Name"
    try {
        & $Action
    }
    catch {
        throw "Step '$Name' failed: $($_.Exception.Message) What to do: $Fix"
    }
}

try {
    if ($InstallRoot -match "['`r`n]") {
        throw "-InstallRoot must not contain a quote or a line break: $InstallRoot"
    }
    if ($FromMsi -and -not $WhatIfPreference) {
        [System.IO.Directory]::CreateDirectory($LogsDir) | Out-Null
        $LogFile = Join-Path $LogsDir $(if ($Rollback) { 'rollback-msi.log' } else { 'uninstall-msi.log' })
        [System.IO.File]::WriteAllText($LogFile, '', $Utf8)
        $who = [System.Security.Principal.WindowsIdentity]::GetCurrent().Name
        Write-Line "$(Get-Date -Format o) $PSCommandPath, run by Windows Installer as $who"
    }

    if ($Rollback) {
        Invoke-Step 'Undo what the failed install.ps1 run created' "Remove what $CreatedList lists by hand (IIS Manager, then the folders)." {
            $entries = @()
            if (Test-Path -LiteralPath $CreatedList) {
                $entries = @(Get-Content -LiteralPath $CreatedList | Where-Object { $_ })
            }
            if ($entries.Count -eq 0) {
                Write-Line '    install.ps1 created nothing'
            }
            [array]::Reverse($entries)
            if ($entries -match "^(application|pool|fastcgi)`t") {
                Import-Module WebAdministration
            }
            foreach ($entry in $entries) {
                $kind, $what = $entry -split "`t", 2
                if ($kind -eq 'application' -and $what -eq $Location -and
                    (Get-WebApplication -Site $SiteName -Name $AppName) -and
                    $PSCmdlet.ShouldProcess($Location, 'Remove application and its settings')) {
                    Remove-WebApplication -Site $SiteName -Name $AppName
                    foreach ($filter in $AuthSections) {
                        Clear-WebConfiguration -PSPath $AppHost -Location $Location -Filter $filter -ErrorAction SilentlyContinue
                    }
                }
                elseif ($kind -eq 'pool' -and (Test-Path -LiteralPath "IIS:\AppPools\$what") -and
                    $PSCmdlet.ShouldProcess($what, 'Remove application pool')) {
                    Remove-WebAppPool -Name $what
                }
                elseif ($kind -eq 'fastcgi' -and $PSCmdlet.ShouldProcess($what, 'Remove FastCGI application')) {
                    $fullPath, $arguments = $what -split '\|', 2
                    Remove-WebConfigurationProperty -PSPath $AppHost -Filter 'system.webServer/fastCgi' -Name '.' -AtElement @{
                        fullPath  = $fullPath
                        arguments = $arguments
                    } -ErrorAction SilentlyContinue
                }
                elseif ($kind -eq 'file' -and (Test-Path -LiteralPath $what) -and
                    $PSCmdlet.ShouldProcess($what, 'Delete file')) {
                    Remove-Item -LiteralPath $what -Force
                }
                elseif ($kind -eq 'folder' -and $what -eq $InstallRoot -and (Test-Path -LiteralPath $what)) {
                    # The root stays for its logs folder: the failed run's transcript and this one.
                    foreach ($child in @(Get-ChildItem -LiteralPath $what -Force | Where-Object { $_.Name -ne 'logs' })) {
                        if ($PSCmdlet.ShouldProcess($child.FullName, 'Delete')) {
                            Remove-Item -LiteralPath $child.FullName -Recurse -Force
                        }
                    }
                }
                elseif ($kind -eq 'folder' -and (Test-Path -LiteralPath $what) -and
                    $PSCmdlet.ShouldProcess($what, 'Delete folder')) {
                    Remove-Item -LiteralPath $what -Recurse -Force
                }
                Write-Line "    undone: $kind $what"
            }
        }
        # Undone: the list must not be replayed by a later rollback.
        if ((Test-Path -LiteralPath $CreatedList) -and $PSCmdlet.ShouldProcess($CreatedList, 'Delete file')) {
            Remove-Item -LiteralPath $CreatedList -Force
        }
        Write-Line "Rolled back what install.ps1 created; its transcript is $(Join-Path $LogsDir 'install-msi.log')."
        exit 0
    }

    Invoke-Step 'Check administrator rights' 'Start PowerShell with "Run as administrator" and run this script again.' {
        $principal = New-Object System.Security.Principal.WindowsPrincipal(
            [System.Security.Principal.WindowsIdentity]::GetCurrent())
        if (-not $principal.IsInRole([System.Security.Principal.WindowsBuiltInRole]::Administrator)) {
            throw 'This PowerShell is not elevated.'
        }
        Import-Module WebAdministration
    }

    Invoke-Step 'Stop the application pool and wait for its processes' "Stop the python.exe processes of $VenvDir (Task Manager, or Stop-Process -Id) and run again." {
        # Running python.exe processes keep the venv's files locked, and stopping them lets
        # each warm PowerShell host remove its Exchange session. A pool install.ps1 did not
        # create is started again once the application is gone (next step but one).
        $app = Get-WebApplication -Site $SiteName -Name $AppName
        $script:StoppedPool = ''
        if ($app) {
            $pool = [string] $app.applicationPool
            if ($pool -and (Test-Path -LiteralPath "IIS:\AppPools\$pool") -and
                (Get-WebAppPoolState -Name $pool).Value -ne 'Stopped' -and
                $PSCmdlet.ShouldProcess($pool, 'Stop application pool')) {
                Stop-WebAppPool -Name $pool
                $script:StoppedPool = $pool
            }
        }
        if (-not $WhatIfPreference) {
            $deadline = (Get-Date).AddSeconds(90)
            while ($true) {
                $running = @(Get-Process -Name 'python', 'pythonw' -ErrorAction SilentlyContinue |
                    Where-Object { $_.Path -and $_.Path.StartsWith($VenvDir, [System.StringComparison]::OrdinalIgnoreCase) })
                if ($running.Count -eq 0) {
                    break
                }
                if ((Get-Date) -gt $deadline) {
                    throw "$($running.Count) python.exe process(es) of $VenvDir still run after 90 seconds (ids $(($running | ForEach-Object { $_.Id }) -join ', '))."
                }
                Start-Sleep -Seconds 1
            }
        }
    }

    Invoke-Step 'Remove the application' 'Close IIS Manager (it may hold applicationHost.config) and run again.' {
        if ((Get-WebApplication -Site $SiteName -Name $AppName) -and $PSCmdlet.ShouldProcess($Location, 'Remove application')) {
            Remove-WebApplication -Site $SiteName -Name $AppName
        }
    }

    Invoke-Step 'Remove its authentication and SSL settings' 'Close IIS Manager and run again.' {
        foreach ($filter in $AuthSections) {
            if ($PSCmdlet.ShouldProcess("$Location $filter", 'Clear')) {
                Clear-WebConfiguration -PSPath $AppHost -Location $Location -Filter $filter -ErrorAction SilentlyContinue
            }
        }
        # The warm-up page's own location (anonymous, plain HTTP for Application Initialization).
        $warmup = "$Location/warmup"
        foreach ($filter in @('system.webServer/security/authentication/anonymousAuthentication', 'system.webServer/security/access')) {
            if ($PSCmdlet.ShouldProcess("$warmup $filter", 'Clear')) {
                Clear-WebConfiguration -PSPath $AppHost -Location $warmup -Filter $filter -ErrorAction SilentlyContinue
            }
        }
    }

    Invoke-Step 'Remove the application pool install.ps1 created' 'Stop the pool in IIS Manager and run again.' {
        $pool = ''
        if (Test-Path -LiteralPath $PoolMarker) {
            $pool = (Get-Content -LiteralPath $PoolMarker -TotalCount 1).Trim()
        }
        if (-not $pool) {
            Write-Line '    install.ps1 created no application pool: the pool stays, with its identity'
            if ($StoppedPool -and $PSCmdlet.ShouldProcess($StoppedPool, 'Start application pool again')) {
                Start-WebAppPool -Name $StoppedPool
            }
        }
        elseif ($PSCmdlet.ShouldProcess($pool, 'Remove application pool')) {
            if (Test-Path -LiteralPath "IIS:\AppPools\$pool") {
                Remove-WebAppPool -Name $pool
            }
            Remove-Item -LiteralPath $PoolMarker -Force
        }
    }

    Invoke-Step 'Remove the FastCGI registration' 'Close IIS Manager and run again.' {
        $fastCgi = Get-WebConfiguration -PSPath $AppHost -Filter 'system.webServer/fastCgi/application' |
            Where-Object { $_.fullPath -eq $VenvPython -and $_.arguments -eq $WfastcgiPy }
        if ($fastCgi -and $PSCmdlet.ShouldProcess("$VenvPython|$WfastcgiPy", 'Remove FastCGI application')) {
            Remove-WebConfigurationProperty -PSPath $AppHost -Filter 'system.webServer/fastCgi' -Name '.' -AtElement @{
                fullPath  = $VenvPython
                arguments = $WfastcgiPy
            }
        }
    }

    Invoke-Step 'Remove the files' "Close whatever has files open under $InstallRoot and run again." {
        $folders = @()
        if ($RemoveFiles -or $FromMsi) {
            $folders += @($VenvDir, (Join-Path $InstallRoot 'app'))
        }
        if ($RemoveData -or $FromMsi) {
            $folders += @($ConfigDir)
        }
        if ($RemoveData) {
            $folders += @((Join-Path $InstallRoot 'data'))
        }
        foreach ($folder in $folders) {
            if ((Test-Path -LiteralPath $folder) -and $PSCmdlet.ShouldProcess($folder, 'Delete folder')) {
                Remove-Item -LiteralPath $folder -Recurse -Force
            }
        }
        # The install transcript goes; this uninstall's own stays, the record of what it did.
        $installLog = Join-Path $LogsDir 'install-msi.log'
        if ($FromMsi -and (Test-Path -LiteralPath $installLog) -and $PSCmdlet.ShouldProcess($installLog, 'Delete file')) {
            Remove-Item -LiteralPath $installLog -Force
        }
        if ($RemoveFiles -and $RemoveData -and (Test-Path -LiteralPath $InstallRoot) -and
            -not (Get-ChildItem -LiteralPath $InstallRoot -Force) -and
            $PSCmdlet.ShouldProcess($InstallRoot, 'Delete empty folder')) {
            Remove-Item -LiteralPath $InstallRoot -Force
        }
        if ($FromMsi -and -not $RemoveData) {
            Write-Line "    kept the journal, audit and service logs in $(Join-Path $InstallRoot 'data') (REMOVEDATA=1 deletes them)"
        }
        elseif (-not $RemoveData) {
            Write-Line "    kept the configuration and data under $InstallRoot (-RemoveData deletes them)"
        }
    }

    Write-Line 'VezaProvisioner is removed from IIS.'
    if ($LogFile) {
        Write-Line "This transcript: $LogFile"
    }
}
catch {
    Write-Line ''
    if ($LogFile) {
        [System.IO.File]::AppendAllText($LogFile, "FAILED: $($_.Exception.Message)" + [Environment]::NewLine, $Utf8)
    }
    Write-Error -Message $_.Exception.Message -ErrorAction Continue
    exit 1
}
