<#
.SYNOPSIS
    Removes VezaProvisioner from IIS: the application, its settings, the application pool, the
    FastCGI registration and (with -RemoveFiles) the installed files.

.DESCRIPTION
    Safe to re-run: whatever is already gone is skipped. -WhatIf shows what would be removed.
    The configuration and data folders (journal, logs) are kept unless -RemoveData is given.
    It stops at the first failed step with a sentence saying what to do.

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
    [string] $AppPoolName = 'VezaProvisionerPool',
    # Also delete the program files (venv and app folders).
    [switch] $RemoveFiles,
    # Also delete the configuration and the data folder (journal and logs).
    [switch] $RemoveData
)

Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'

$AppHost = 'MACHINE/WEBROOT/APPHOST'
$Location = "$SiteName/$AppName"
$VenvDir = Join-Path $InstallRoot 'venv'
$VenvPython = Join-Path $VenvDir 'Scripts\python.exe'
$WfastcgiPy = Join-Path $VenvDir 'Lib\site-packages\wfastcgi.py'

function Invoke-Step {
    # Runs one step; a failure stops the script with what failed and what to do about it.
    param([string] $Name, [string] $Fix, [scriptblock] $Action)
    Write-Host "==> $Name"
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

    Invoke-Step 'Check administrator rights' 'Start PowerShell with "Run as administrator" and run this script again.' {
        $principal = New-Object System.Security.Principal.WindowsPrincipal(
            [System.Security.Principal.WindowsIdentity]::GetCurrent())
        if (-not $principal.IsInRole([System.Security.Principal.WindowsBuiltInRole]::Administrator)) {
            throw 'This PowerShell is not elevated.'
        }
        Import-Module WebAdministration
    }

    Invoke-Step 'Remove the application' 'Close IIS Manager (it may hold applicationHost.config) and run again.' {
        if ((Get-WebApplication -Site $SiteName -Name $AppName) -and $PSCmdlet.ShouldProcess($Location, 'Remove application')) {
            Remove-WebApplication -Site $SiteName -Name $AppName
        }
    }

    Invoke-Step 'Remove its authentication and SSL settings' 'Close IIS Manager and run again.' {
        $sections = @(
            'system.webServer/security/authentication/anonymousAuthentication',
            'system.webServer/security/authentication/windowsAuthentication',
            'system.webServer/security/authentication/basicAuthentication',
            'system.webServer/security/access'
        )
        foreach ($filter in $sections) {
            if ($PSCmdlet.ShouldProcess("$Location $filter", 'Clear')) {
                Clear-WebConfiguration -PSPath $AppHost -Location $Location -Filter $filter -ErrorAction SilentlyContinue
            }
        }
    }

    Invoke-Step 'Remove the application pool' 'Stop the pool in IIS Manager and run again.' {
        if ((Test-Path -LiteralPath "IIS:\AppPools\$AppPoolName") -and $PSCmdlet.ShouldProcess($AppPoolName, 'Remove application pool')) {
            Remove-WebAppPool -Name $AppPoolName
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
        if ($RemoveFiles) {
            $folders += @($VenvDir, (Join-Path $InstallRoot 'app'))
        }
        if ($RemoveData) {
            $folders += @((Join-Path $InstallRoot 'config'), (Join-Path $InstallRoot 'data'))
        }
        foreach ($folder in $folders) {
            if ((Test-Path -LiteralPath $folder) -and $PSCmdlet.ShouldProcess($folder, 'Delete folder')) {
                Remove-Item -LiteralPath $folder -Recurse -Force
            }
        }
        if ($RemoveFiles -and $RemoveData -and (Test-Path -LiteralPath $InstallRoot) -and
            -not (Get-ChildItem -LiteralPath $InstallRoot -Force) -and
            $PSCmdlet.ShouldProcess($InstallRoot, 'Delete empty folder')) {
            Remove-Item -LiteralPath $InstallRoot -Force
        }
        if (-not $RemoveData) {
            Write-Host "    kept the configuration and data under $InstallRoot (-RemoveData deletes them)"
        }
    }

    Write-Host 'VezaProvisioner is removed from IIS.'
}
catch {
    Write-Host ''
    Write-Error -Message $_.Exception.Message -ErrorAction Continue
    exit 1
}
